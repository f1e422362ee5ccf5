"""Instruction (VQA) samples: the loss covers exactly the answer and EOS, with the word list's
built-in template and with a Hugging Face tokenizer's Jinja chat template; the answer position;
the one-line errors; and ``prepare-digits --vqa`` as an Energon dataset (``docs/data.md``,
"Instruction data (VQA)")."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from megatron_mimo.data import vqa as vqa_module  # noqa: E402
from megatron_mimo.data.digits import (  # noqa: E402
    QUESTIONS,
    answer_of,
    data_main,
    load_digits,
    vqa_words,
)
from megatron_mimo.data.energon import SampleFormat, sample_format_for  # noqa: E402
from megatron_mimo.data.hf_tokenizer import HFTokenizer, write_word_level  # noqa: E402
from megatron_mimo.data.tokenizer import SequenceLayout, WordTokenizer  # noqa: E402
from megatron_mimo.errors import DataError  # noqa: E402

SEQ, IMAGE_TOKENS, IMAGE_TOKEN_ID, IMAGE_SIZE = 20, 3, 99, 8
IMAGE = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE)
QUESTION = "which digit is this ?"
ANSWERS = ["the digit seven", "seven"]
"""Several answers: the first (three tokens) is trained on."""
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {% generation %}{{ m['content'] }} {{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
"""Prints BOS and EOS itself (the layout must not double them); uses transformers' tags."""


def word_format(seq: int = SEQ) -> SampleFormat:
    tok = WordTokenizer.from_captions([*vqa_words(), "the"])
    return SampleFormat(IMAGE_SIZE, SequenceLayout.for_tokenizer(tok, seq, IMAGE_TOKENS,
                                                                IMAGE_TOKEN_ID), tok)


def chat_tokenizer(tmp_path: Path, template: str = CHAT_TEMPLATE, where: str = "config") -> Path:
    """A WordLevel HF tokenizer with a chat template in tokenizer_config.json (or in
    chat_template.jinja)."""
    out = write_word_level([*vqa_words(), "the", "USER:", "ASSISTANT:", "A:"], tmp_path / "tok")
    if where == "config":
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (out / "chat_template.jinja").write_text(template)
    return out


def hf_format(directory: Path, seq: int = SEQ) -> SampleFormat:
    return sample_format_for(directory, IMAGE_SIZE, seq, IMAGE_TOKENS, 4, str(directory), 128)


def ids_of(fmt: SampleFormat, text: str) -> list[int]:
    return fmt.tokenizer.encode(text)


def check_answer_only_loss(fmt: SampleFormat, prompt: list[int], answer: list[int]) -> None:
    """The sequence is [BOS, image, prompt, answer, EOS, PAD...]; the loss covers exactly the
    positions whose labels are the answer's ids and EOS; answer_position predicts answer[0]."""
    out = fmt.encode_vqa("k7", IMAGE, QUESTION, ANSWERS)
    tok, start = fmt.tokenizer, 1 + IMAGE_TOKENS
    text = prompt + answer + [tok.eos_id]
    expected = [tok.bos_id] + [fmt.layout.image_token_id] * IMAGE_TOKENS + text
    expected += [tok.pad_id] * (SEQ - len(expected))
    assert out["input_ids"].tolist() == expected
    masked = out["loss_mask"].nonzero().flatten().tolist()
    first = start + len(prompt) - 1
    assert masked == list(range(first, first + len(answer) + 1))
    assert out["labels"][out["loss_mask"].bool()].tolist() == answer + [tok.eos_id]
    assert int(out["answer_position"]) == first
    assert int(out["labels"][out["answer_position"]]) == answer[0]


def test_word_tokenizer_loss_covers_exactly_the_answer_and_eos():
    fmt = word_format()
    check_answer_only_loss(fmt, ids_of(fmt, QUESTION), ids_of(fmt, ANSWERS[0]))


def test_hf_chat_template_loss_covers_exactly_the_answer_and_eos(tmp_path):
    fmt = hf_format(chat_tokenizer(tmp_path))
    assert fmt.turn.template == CHAT_TEMPLATE
    prompt = ids_of(fmt, f"USER: {QUESTION} ASSISTANT:")  # the template's BOS is the layout's
    check_answer_only_loss(fmt, prompt, ids_of(fmt, ANSWERS[0]))


def test_chat_template_jinja_file_is_read_like_transformers(tmp_path):
    directory = chat_tokenizer(tmp_path, where="file")
    assert HFTokenizer.load(directory).chat_template == CHAT_TEMPLATE
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    messages = [{"role": "user", "content": QUESTION}]
    assert fmt_render(hf_format(directory), None) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": ANSWERS[0]})
    assert fmt_render(hf_format(directory), ANSWERS[0]) == reference.apply_chat_template(
        messages, tokenize=False)


def fmt_render(fmt: SampleFormat, answer: str | None) -> str:
    return fmt.turn.render(QUESTION, answer, "k7")


def test_a_tokenizer_without_template_uses_the_built_in_default(tmp_path):
    fmt = hf_format(write_word_level([*vqa_words(), "the"], tmp_path / "plain"))
    assert fmt.turn.template is None
    check_answer_only_loss(fmt, ids_of(fmt, QUESTION), ids_of(fmt, ANSWERS[0]))


def one_line_error(call, match: str) -> str:
    with pytest.raises(DataError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_cut_answer_is_one_line_naming_the_sample():
    fits = 1 + IMAGE_TOKENS + 5 + 3 + 1  # question, answer, EOS
    word_format(fits).encode_vqa("k7", IMAGE, QUESTION, ANSWERS)
    one_line_error(lambda: word_format(fits - 1).encode_vqa("k7", IMAGE, QUESTION, ANSWERS),
                   r"^sample k7: .*--seq-length is 12: the answer would be cut")


def test_a_template_that_tokenizes_across_the_boundary_is_one_line_naming_the_sample(tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                "{% else %}A: {{ m['content'] }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    fmt = hf_format(chat_tokenizer(tmp_path, template))
    one_line_error(lambda: fmt.encode_vqa("k7", IMAGE, QUESTION, ANSWERS),
                   r"^sample k7: the chat template of .* tokenizes differently across the "
                   r"question/answer boundary")


def test_no_answer_a_broken_template_and_a_missing_jinja2_are_one_line(tmp_path, monkeypatch):
    one_line_error(lambda: word_format().encode_vqa("k7", IMAGE, QUESTION, []),
                   r"^sample k7: the VQA sample has no answer")
    one_line_error(lambda: hf_format(chat_tokenizer(tmp_path / "a", "{% if %}")),
                   r"the chat template of .*: cannot compile it")
    failing = chat_tokenizer(tmp_path / "b", "{{ raise_exception('no system role') }}")
    one_line_error(lambda: hf_format(failing).encode_vqa("k7", IMAGE, QUESTION, ANSWERS),
                   r"^sample k7: the chat template of .* failed: no system role")
    vqa_module.compile_template.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)
    one_line_error(lambda: hf_format(chat_tokenizer(tmp_path / "c")), r"needs jinja2")
    vqa_module.compile_template.cache_clear()


@pytest.fixture(scope="module")
def vqa_digits(tmp_path_factory) -> Path:
    """``megatron-mimo data prepare-digits OUT --vqa`` (defaults: 32 px, 1,500 / 297)."""
    pytest.importorskip("megatron.energon")
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("vqa") / "ds"
    assert data_main(["prepare-digits", str(root), "--vqa"]) == 0
    return root


def written_samples(root: Path) -> dict[str, dict]:
    """Every sample's JSON member, read from the tars."""
    samples = {}
    for shard in sorted(root.glob("*/shard_*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    samples[member.name.removesuffix(".json")] = json.load(
                        io.BytesIO(tar.extractfile(member).read()))
    return samples


def test_prepare_vqa_writes_three_question_kinds_with_correct_answers(vqa_digits):
    samples = written_samples(vqa_digits)
    assert len(samples) == 1797
    kinds = Counter(s["question"] for s in samples.values())
    assert set(kinds) == set(QUESTIONS) and min(kinds.values()) > 0.3 * len(samples)
    labels = {key: label for key, _, label in load_digits(seed=0)}
    assert all(s["answers"] == [answer_of(QUESTIONS.index(s["question"]), labels[k])]
               for k, s in samples.items())
    checked = {QUESTIONS[0]: "seven", QUESTIONS[1]: "no", QUESTIONS[2]: "eight"}
    sevens = [s for k, s in samples.items() if labels[k] == 7]
    assert {(s["question"], s["answers"][0]) for s in sevens} == set(checked.items())
    assert answer_of(2, 9) == "zero" and answer_of(1, 0) == "yes"
    assert "VQASample" in (vqa_digits / ".nv-meta" / "dataset.yaml").read_text()
    words = WordTokenizer.load(vqa_digits).words
    assert words[:3] == ("<bos>", "<eos>", "<pad>") and "<image>" not in words
    assert set(words[3:]) == {w for text in vqa_words() for w in text.split()}


def test_energon_reads_the_vqa_dataset_with_answer_only_loss(vqa_digits):
    from megatron_mimo.data.energon import ViewSpec, build_val_loader

    fmt = sample_format_for(vqa_digits, 16, 24, 4, 255)
    tok, labels = fmt.tokenizer, {key: label for key, _, label in load_digits(seed=0)}
    seen = 0
    for batch in build_val_loader(ViewSpec(vqa_digits, 0, 1, 0, 1234, 33), fmt):
        for row, key in enumerate(batch["keys"]):
            mask = batch["loss_mask"][row].bool()
            targets = [tok.words[i] for i in batch["labels"][row][mask].tolist()]
            question = tok.decode(batch["input_ids"][row].tolist()).removesuffix(f" {targets[0]}")
            answer = answer_of(QUESTIONS.index(question), labels[key])
            assert targets == [answer, "<eos>"]
            assert tok.words[batch["labels"][row][batch["answer_position"][row]]] == answer
            seen += 1
    assert seen == 297


def tiny_llava_vocabulary() -> list[str]:
    path = Path(__file__).parents[2] / "examples" / "tiny_llava.py"
    spec = importlib.util.spec_from_file_location("tiny_llava_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vocabulary()


def test_the_tiny_llava_tokenizer_trains_on_the_vqa_dataset(vqa_digits, tmp_path):
    """The whole path with the imported model's HF tokenizer: flags -> Energon -> ids; every
    question and answer word is in its vocabulary (an unknown word would be an error)."""
    from megatron_mimo.config.cli import config_from_args
    from megatron_mimo.data.source import build_branch_data

    tok_dir = write_word_level(tiny_llava_vocabulary(), tmp_path / "tok")
    cfg, _ = config_from_args(["--config", "digits_cpu", "--data-path", str(vqa_digits),
                               "--tokenizer-model", str(tok_dir), "--image-token-id", "4"])
    source = build_branch_data(cfg, "language", 0)
    try:
        batch = source.next_global_batch()[0]
        tok = source.sample_format.tokenizer
    finally:
        source.close()
    rows = torch.arange(len(batch["keys"]))
    answers = {tok.backend.id_to_token(a)
               for a in batch["labels"][rows, batch["answer_position"]].tolist()}
    assert answers <= {w for text in vqa_words()[len(QUESTIONS):] for w in text.split()}
    assert (batch["loss_mask"].sum(dim=1) == 2).all()  # a one-word answer and EOS
