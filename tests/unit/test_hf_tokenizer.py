"""Hugging Face caption tokenizer (``--tokenizer-model``): a WordLevel one written in process and a
small trained BPE, the sequence layout with their ids, the answer rule, the one-line errors and
the start-up checks against the model (``docs/data.md``, "Tokenizers")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")

from megatron_mimo.config.cli import config_from_args  # noqa: E402
from megatron_mimo.data.energon import sample_format_for  # noqa: E402
from megatron_mimo.data.hf_tokenizer import HFTokenizer, write_word_level  # noqa: E402
from megatron_mimo.data.tokenizer import (  # noqa: E402
    SequenceLayout,
    WordTokenizer,
    word_token_index,
)
from megatron_mimo.errors import ConfigError, DataError  # noqa: E402

WORDS = ["the", "digit", "seven", "eight", "a", "picture", "of"]
SEQ, IMAGE_TOKENS = 12, 3
BPE_CORPUS = ["the digit seven", "the digit six", "seventeen sevens", "sixty", "seven"] * 5


@pytest.fixture
def word_level(tmp_path) -> Path:
    return write_word_level(WORDS, tmp_path / "tok")


@pytest.fixture
def bpe(tmp_path) -> Path:
    """A SentencePiece-like BPE (Metaspace ``▁``), trained on a few words; config tokens as
    ``{"content": ...}`` dicts and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<image>", "<s>", "</s>"])
    backend.train_from_iterator(BPE_CORPUS, trainer)
    out = tmp_path / "bpe"
    out.mkdir()
    backend.save(str(out / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": {"content": "</s>"},
              "pad_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def one_line_error(call, match: str) -> str:
    with pytest.raises(DataError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_write_word_level_loads_with_transformers_and_gives_the_same_ids(word_level):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(word_level))
    ours = HFTokenizer.load(word_level)
    for caption in ["the digit seven", "a picture of the digit eight", "seven  eight "]:
        assert ours.encode(caption) == reference(caption, add_special_tokens=False)["input_ids"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id,
        reference.unk_token_id) == (0, 1, 2, 3)
    assert ours.image_token_id == reference.convert_tokens_to_ids("<image>") == 4
    assert ours.vocab_size == len(reference) == 5 + len(WORDS)


def test_layout_with_hf_ids(word_level):
    tok = HFTokenizer.load(word_level)
    ids, answer = tok.encode_with_answer("the digit seven", "k")
    the, digit, seven = (tok.backend.token_to_id(w) for w in ("the", "digit", "seven"))
    assert (ids, answer) == ([the, digit, seven], 2)
    out = SequenceLayout.for_tokenizer(tok, SEQ, IMAGE_TOKENS, tok.image_token_id).build(ids, "k",
                                                                                          answer)
    assert out["input_ids"].tolist() == [0, 4, 4, 4, the, digit, seven, 1, 2, 2, 2, 2]
    assert out["labels"].tolist() == out["input_ids"].roll(-1).tolist()
    covered = [int(out["labels"][p]) for p in range(SEQ) if out["loss_mask"][p] == 1]
    assert covered == [the, digit, seven, 1]  # exactly the caption and EOS
    assert int(out["labels"][out["answer_position"]]) == seven


def test_answer_is_the_first_token_of_a_last_word_of_two_tokens(bpe):
    tok = HFTokenizer.load(bpe)
    encoding = tok.backend.encode("the digit seventy", add_special_tokens=False)
    last_word = [i for i, (_, end) in enumerate(encoding.offsets) if end > len("the digit ")]
    assert len(last_word) == 2, encoding.tokens  # the precondition: 'seventy' is 2 tokens
    ids, answer = tok.encode_with_answer("the digit seventy")
    assert answer == last_word[0]
    assert (tok.bos_id, tok.eos_id) == (tok.backend.token_to_id("<s>"),
                                        tok.backend.token_to_id("</s>"))
    assert tok.pad_id == tok.eos_id  # no pad token: EOS pads, as with Llama
    out = SequenceLayout.for_tokenizer(tok, SEQ, IMAGE_TOKENS, tok.image_token_id).build(
        ids, "k", answer)
    assert int(out["labels"][out["answer_position"]]) == ids[answer]
    assert out["loss_mask"].sum() == len(ids) + 1
    end = 1 + IMAGE_TOKENS + len(ids)  # the tokenizer's own ids, not the word list's 0/1/2
    assert out["input_ids"].tolist() == ([tok.bos_id] + [tok.image_token_id] * IMAGE_TOKENS + ids
                                         + [tok.eos_id] + [tok.pad_id] * (SEQ - end - 1))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 3)


def test_sample_format_measures_the_answer_on_the_first_token_of_the_last_word(bpe, tmp_path):
    tok = HFTokenizer.load(bpe)
    ids, answer = tok.encode_with_answer("the digit seventy")
    assert answer < len(ids) - 1
    fmt = sample_format_for(tmp_path, 16, SEQ, IMAGE_TOKENS, tok.image_token_id, str(bpe),
                            tok.vocab_size)
    sample = fmt.encode("k", torch.zeros(3, 16, 16), "the digit seventy")
    assert int(sample["labels"][sample["answer_position"]]) == ids[answer]


def test_an_answer_word_inside_the_caption_is_scored_on_its_first_token(bpe):
    """Audio captions have two answers ("image seven tone three"): a word that is not the last
    is found by its index, on its first token, also when BPE splits it."""
    tok = HFTokenizer.load(bpe)
    caption = "the seventy digit seven"
    encoding = tok.backend.encode(caption, add_special_tokens=False)
    second = [i for i, (start, end) in enumerate(encoding.offsets)
              if end > len("the ") and start < len("the seventy")]
    assert len(second) == 2, encoding.tokens  # the precondition: 'seventy' is 2 tokens
    ids, index = word_token_index(tok, caption, 1, "k")
    assert ids == list(encoding.ids) and index == second[0]
    assert word_token_index(tok, caption, 3, "k")[1] == tok.encode_with_answer(caption)[1]
    layout = SequenceLayout.for_tokenizer(tok, 16, 2, tok.image_token_id, 2, 39)
    out = layout.build(ids, "k", index, len(ids) - 1)
    assert int(out["labels"][out["answer_position"]]) == ids[second[0]]
    assert int(out["labels"][out["audio_answer_position"]]) == ids[-1]


def test_the_audio_placeholder_is_the_tokenizers_audio_token_or_above_its_ids(word_level,
                                                                                tmp_path):
    tok = HFTokenizer.load(word_level)  # no '<audio>': the model's id must be no text id
    tok.check_audio_token(tok.vocab_size)
    one_line_error(lambda: tok.check_audio_token(5), "the model's audio token id 5 is the "
                                                     "tokenizer's 'the': add an '<audio>' token "
                                                     f"or pass an --audio-token-id of at least "
                                                     f"{tok.vocab_size}")
    with_audio = HFTokenizer.load(write_word_level([*WORDS, "<audio>"], tmp_path / "audio"))
    own = with_audio.backend.token_to_id("<audio>")
    with_audio.check_audio_token(own)
    one_line_error(lambda: with_audio.check_audio_token(own + 1),
                   f"'<audio>' is id {own} but the model's audio token id is {own + 1}: pass "
                   f"--audio-token-id {own}")


def test_special_tokens_fall_back_to_the_tokenizers_own(word_level):
    (word_level / "tokenizer_config.json").unlink()
    tok = HFTokenizer.load(word_level)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 2, 3)


def test_word_tokenizer_serves_the_same_protocol():
    tok = WordTokenizer.from_captions(["the digit seven"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_token_id) == (0, 1, 2, None)
    ids, answer = tok.encode_with_answer("the digit seven")
    assert (ids, answer) == ([3, 4, 5], 2)
    out = SequenceLayout.for_tokenizer(tok, SEQ, IMAGE_TOKENS, 255).build(ids, "k", answer)
    assert out["input_ids"].tolist() == [0, 255, 255, 255, 3, 4, 5, 1, 2, 2, 2, 2]
    assert int(out["answer_position"]) == 1 + IMAGE_TOKENS + len(ids) - 2


def test_missing_or_unreadable_tokenizer_json_is_one_line_naming_it(tmp_path):
    for damage in (lambda: None, lambda: (tmp_path / "tokenizer.json").write_text("{\n")):
        damage()
        message = one_line_error(lambda: HFTokenizer.load(tmp_path), "cannot read the Hugging "
                                                                     "Face tokenizer")
        assert message.startswith(f"{tmp_path / 'tokenizer.json'}: ")


def test_bad_tokenizer_config_is_one_line_naming_it(word_level):
    (word_level / "tokenizer_config.json").write_text("[1,")
    one_line_error(lambda: HFTokenizer.load(word_level), r"tokenizer_config.json: cannot read")
    (word_level / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<start>"}))
    one_line_error(lambda: HFTokenizer.load(word_level),
                   r"tokenizer_config.json: bos_token '<start>' is not in .*tokenizer.json")


def test_a_tokenizer_without_image_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json"))
    one_line_error(lambda: HFTokenizer.load(tmp_path),
                   r"tokenizer.json: the tokenizer has no '<image>' token")


def test_unknown_word_names_the_sample_the_word_and_the_file(word_level, bpe):
    tok = HFTokenizer.load(word_level)
    message = one_line_error(lambda: tok.encode("the digit nine", "train/000042"),
                             r"sample train/000042: word 'nine' of caption 'the digit nine' is "
                             r"the unknown token \(id 3\)")
    assert message.endswith(str(word_level / "tokenizer.json"))
    bpe_tok = HFTokenizer.load(bpe)  # 'z' is not in its alphabet: the whole word is named
    one_line_error(lambda: bpe_tok.encode("the digit zero", "val/7"),
                   r"sample val/7: word 'zero' of caption 'the digit zero' is the unknown token")


def test_model_must_match_the_image_id_and_hold_the_vocabulary(word_level, tmp_path):
    def fmt(image_token_id: int, vocab_size: int):
        return sample_format_for(tmp_path, 16, SEQ, IMAGE_TOKENS, image_token_id,
                                 str(word_level), vocab_size)

    one_line_error(lambda: fmt(255, 256), r"tokenizer.json: '<image>' is id 4 but the model's "
                                          r"image token id is 255: pass --image-token-id 4")
    one_line_error(lambda: fmt(4, 8), r"tokenizer.json: ids go up to 11 but the model's "
                                      r"--vocab-size is 8: raise --vocab-size to at least 12")
    sample = fmt(4, 12).encode("k", torch.zeros(3, 16, 16), "the digit seven")
    assert isinstance(fmt(4, 12).tokenizer, HFTokenizer)
    assert sample["input_ids"][:8].tolist() == [0, 4, 4, 4, 5, 6, 7, 1]


def test_tokenizer_model_flag(word_level, tmp_path):
    cfg, _ = config_from_args(["--tokenizer-model", str(word_level), "--data-path", str(tmp_path)])
    assert cfg.data.tokenizer_model == str(word_level)
    assert config_from_args([])[0].data.tokenizer_model is None
    with pytest.raises(ConfigError, match="tokenizer_model tokenizes the captions of data.data_path"):
        config_from_args(["--tokenizer-model", str(word_level)])


def test_energon_source_reads_captions_with_the_hf_tokenizer(digits_dataset, tmp_path):
    """The whole path: flags -> build_branch_data -> Energon -> HF ids; answers are digits."""
    from megatron_mimo.data.digits import DIGIT_WORDS
    from megatron_mimo.data.source import build_branch_data

    tok_dir = write_word_level(WordTokenizer.load(digits_dataset).words[3:], tmp_path / "tok")
    cfg, _ = config_from_args(["--config", "digits_cpu", "--data-path", str(digits_dataset),
                               "--tokenizer-model", str(tok_dir), "--image-token-id", "4"])
    source = build_branch_data(cfg, "language", 0)
    try:
        tok = source.sample_format.tokenizer
        assert isinstance(tok, HFTokenizer)
        batch = source.next_global_batch()[0]
    finally:
        source.close()
    rows = torch.arange(len(batch["keys"]))
    answers = batch["labels"][rows, batch["answer_position"]].tolist()
    assert {tok.backend.id_to_token(a) for a in answers} <= set(DIGIT_WORDS)
    assert (batch["input_ids"][:, 1:1 + cfg.images.num_image_tokens] == 4).all()
