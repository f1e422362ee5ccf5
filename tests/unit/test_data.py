"""Mock data, the resumable per-branch sampler, and the token layout of one sample (with and
without audio slots)."""

import dataclasses
import hashlib

import pytest
import torch

from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.presets import tiny_cpu
from megatron_mimo.data.audio import silence
from megatron_mimo.data.mock import MockImageText
from megatron_mimo.data.sampler import BranchSampler, DataPosition
from megatron_mimo.data.tokenizer import SequenceLayout, WordTokenizer, word_token_index
from megatron_mimo.errors import ConfigError, DataError


@pytest.fixture
def data():
    cfg = tiny_cpu()
    return MockImageText(cfg.images, cfg.language, seed=7)


def test_samples_are_a_pure_function_of_seed_and_index(data):
    assert torch.equal(data.pixels([3, 9]), data.pixels([3, 9]))
    assert torch.equal(data.tokens([3])["input_ids"][0], data.tokens([1, 2, 3])["input_ids"][2])
    assert not torch.equal(data.pixels([3]), data.pixels([4]))
    other_seed = MockImageText(data.images, data.language, seed=8)
    assert not torch.equal(other_seed.pixels([3]), data.pixels([3]))


def test_text_layout_and_masks(data):
    batch = data.tokens([0, 1])
    image_id, patches = data.language.image_token_id, data.images.num_image_tokens
    assert batch["input_ids"].shape == (2, data.language.seq_length)
    assert ((batch["input_ids"] == image_id).sum(dim=1) == patches).all()
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    # no loss where the label is an image slot, nor at the last position; loss on all text labels
    assert batch["loss_mask"][:, :patches].sum() == 0 and batch["loss_mask"][:, -1].sum() == 0
    assert batch["loss_mask"][:, patches:-1].eq(1).all()
    assert batch["sample_index"].tolist() == [0, 1]
    assert batch["input_ids"].max() < data.language.vocab_size


def test_text_depends_on_the_image_class(data):
    classes = {data.image_class(i) for i in range(64)}
    assert len(classes) > 8
    a, b = next((i, j) for i in range(64) for j in range(64)
                if data.image_class(i) != data.image_class(j))
    ids = data.tokens([a, b])["input_ids"]
    assert not torch.equal(ids[0], ids[1])


def test_sampler_splits_each_micro_batch_over_dp_in_order():
    ranks = [BranchSampler(job_micro_batch=4, dp_size=2, dp_rank=r) for r in range(2)]
    assert [s.indices(0, 0) for s in ranks] == [[0, 1], [2, 3]]
    assert [s.indices(0, 1) for s in ranks] == [[4, 5], [6, 7]]
    single = BranchSampler(job_micro_batch=4, dp_size=1, dp_rank=0)
    # both branches see the same samples per micro-step, whatever their DP
    assert single.indices(8, 1) == ranks[0].indices(8, 1) + ranks[1].indices(8, 1)


def test_sampler_resumes_at_any_consumed_offset():
    sampler = BranchSampler(job_micro_batch=2, dp_size=2, dp_rank=1)
    straight = [sampler.indices(it * 8, m) for it in range(4) for m in range(4)]
    resumed = [sampler.indices(16 + it * 8, m) for it in range(2) for m in range(4)]
    assert resumed == straight[8:]


def test_sampler_rejects_bad_split():
    with pytest.raises(DataError, match="does not split"):
        BranchSampler(job_micro_batch=3, dp_size=2, dp_rank=0)
    with pytest.raises(DataError, match="outside dp size"):
        BranchSampler(job_micro_batch=4, dp_size=2, dp_rank=2)


def test_data_position_round_trips_and_advances():
    position = DataPosition()
    position.advance(8)
    position.advance(8)
    restored = DataPosition()
    restored.load_state_dict(position.state_dict())
    assert restored.consumed_samples == 16 and restored.state_dict() == {"consumed_samples": 16}


def _mock_source(branch: str, dp_rank: int = 0, dp: int = 2, blank: bool = False):
    from megatron_mimo.data.source import MockSource

    cfg = tiny_cpu()
    return MockSource(MockImageText(cfg.images, cfg.language, seed=7),
                      BranchSampler(job_micro_batch=4, dp_size=dp, dp_rank=dp_rank),
                      branch=branch, num_microbatches=2, global_batch_size=8, blank_images=blank)


def test_mock_source_gives_each_branch_its_fields_and_advances():
    images, language = _mock_source("images", 1), _mock_source("language", 0, dp=1)
    image_batches, text_batches = images.next_global_batch(), language.next_global_batch()
    assert set(image_batches[0]) == {"keys", "pixels"}
    assert {"input_ids", "labels", "loss_mask", "answer_position"} <= set(text_batches[0])
    assert images.last_keys == [["2", "3"], ["6", "7"]]  # DP rank 1's half of each micro-step
    assert language.last_keys == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert images.consumed_samples == language.consumed_samples == 8
    blank = _mock_source("images", 1, blank=True).next_global_batch()
    assert blank[0]["pixels"].abs().sum() == 0 and image_batches[0]["pixels"].abs().sum() > 0


def test_mock_source_state_round_trips_and_refuses_real_data_state():
    source = _mock_source("language")
    source.next_global_batch()
    restored = _mock_source("language")
    restored.load_state_dict(source.state_dict())
    assert restored.upcoming_indices() == source.upcoming_indices() == [8, 9]
    restored.restart_at(24)
    assert restored.upcoming_indices() == [24, 25]
    with pytest.raises(DataError, match="trained on --data-path /data/x"):
        restored.load_state_dict({"consumed_samples": 8, "record": {"data_path": "/data/x"}})


def test_mock_samples_without_audio_are_the_same_bits_as_before_the_audio_branch():
    """A digest of the text tensors taken before audio existed: old checkpoints and recorded
    runs resume onto the same samples."""
    cfg = tiny_cpu()
    tokens = MockImageText(cfg.images, cfg.language, seed=7).tokens([0, 1, 2, 3, (1 << 40) + 5])
    digest = hashlib.sha256()
    for name in sorted(tokens):
        digest.update(name.encode())
        digest.update(tokens[name].numpy().tobytes())
    assert digest.hexdigest()[:16] == "82e666555664970f"
    assert "audio_answer_position" not in tokens


@pytest.fixture
def av_data():
    cfg = tiny_cpu()
    return MockImageText(cfg.images, cfg.language, seed=7, audio=cfg.audio)


def test_mock_audio_is_a_pure_function_of_seed_and_index(av_data):
    audio = av_data.audio_model
    clips = av_data.audio([3, 9])
    assert clips.shape == (2, audio.num_mel_bins, audio.max_frames) and clips.dtype == torch.float32
    assert torch.equal(clips, av_data.audio([3, 9]))
    assert torch.equal(av_data.audio([9])[0], clips[1])
    assert not torch.equal(clips[0], clips[1])
    other_seed = MockImageText(av_data.images, av_data.language, seed=8, audio=audio)
    assert not torch.equal(other_seed.audio([3]), av_data.audio([3]))
    # a clip of some frames, padded on the right with the features of silence as real clips are
    quiet = silence(audio)
    lengths = set()
    for clip in av_data.audio(list(range(32))):
        silent = (clip == quiet).all(dim=0).tolist()
        length = silent.index(True) if True in silent else len(silent)
        assert length >= 1 and all(silent[length:]), silent
        lengths.add(length)
    assert len(lengths) > 4 and min(lengths) < audio.max_frames
    # the image side is untouched by the audio
    plain = MockImageText(av_data.images, av_data.language, seed=7)
    assert torch.equal(plain.pixels([3, 9]), av_data.pixels([3, 9]))


def test_mock_audio_class_is_independent_of_the_image_class(av_data):
    pairs = [(av_data.image_class(i), av_data.audio_class(i)) for i in range(512)]
    assert sum(a == b for a, b in pairs) < 512 // 8  # chance: 1 in 16
    for image_class in range(4):  # every image class meets many audio classes
        assert len({a for i, a in pairs if i == image_class}) >= 8
    clips = av_data.audio(list(range(64)))
    same = [i for i in range(64) if av_data.audio_class(i) == av_data.audio_class(0)]
    differ = next(i for i in range(64) if av_data.audio_class(i) != av_data.audio_class(0))
    profile = clips[:, :, 0]  # the first frame always holds the clip
    assert (profile[same] - profile[0]).abs().max() < 1.0  # noise only
    assert (profile[differ] - profile[0]).abs().max() > 1.0


def test_mock_text_with_audio_slots_and_two_answers(av_data):
    batch = av_data.tokens(list(range(64)))
    lang = av_data.language
    image_len, audio_len = av_data.images.num_image_tokens, av_data.audio_model.num_audio_tokens
    media = image_len + audio_len
    ids = batch["input_ids"]
    assert ids.shape == (64, lang.seq_length) and (ids[:, 0] == 0).all()
    assert (ids[:, 1:1 + image_len] == lang.image_token_id).all()
    assert (ids[:, 1 + image_len:1 + media] == lang.audio_token_id).all()
    text = ids[:, 1 + media:]
    assert not ((text == lang.image_token_id) | (text == lang.audio_token_id)).any()
    assert ids.max() < lang.vocab_size
    assert torch.equal(batch["labels"][:, :-1], ids[:, 1:])
    # no loss where the label is a slot, nor at the last position; loss on every text label
    assert batch["loss_mask"][:, :media].sum() == 0 and batch["loss_mask"][:, -1].sum() == 0
    assert batch["loss_mask"][:, media:-1].eq(1).all()
    rows = torch.arange(64)
    image_answer = batch["labels"][rows, batch["answer_position"]]
    audio_answer = batch["labels"][rows, batch["audio_answer_position"]]
    for i in range(64):  # each answer is decided by its own input's class, and only by it
        for j in range(64):
            assert (image_answer[i] == image_answer[j]) == (
                av_data.image_class(i) == av_data.image_class(j))
            assert (audio_answer[i] == audio_answer[j]) == (
                av_data.audio_class(i) == av_data.audio_class(j))


def test_mock_text_with_audio_never_holds_a_placeholder_id():
    cfg = tiny_cpu()
    for image_token, audio_token in ((3, 5), (5, 3), (None, None), (0, 1)):
        language = dataclasses.replace(cfg.language, image_token=image_token,
                                       audio_token=audio_token)
        data = MockImageText(cfg.images, language, seed=1, audio=cfg.audio)
        media = cfg.images.num_image_tokens + cfg.audio.num_audio_tokens
        ids = data.tokens(list(range(40)))["input_ids"][:, 1 + media:]
        assert not ((ids == language.image_token_id) | (ids == language.audio_token_id)).any()
        assert ids.max() < language.vocab_size


def _av_source(branch: str, dp_rank: int = 0, dp: int = 1, blank: bool = False):
    from megatron_mimo.data.source import MockSource, text_fields

    cfg = tiny_cpu()
    return MockSource(MockImageText(cfg.images, cfg.language, seed=7, audio=cfg.audio),
                      BranchSampler(job_micro_batch=4, dp_size=dp, dp_rank=dp_rank),
                      branch=branch, num_microbatches=2, global_batch_size=8, blank_images=False,
                      blank_audio=blank, silence=silence(cfg.audio),
                      text_fields=text_fields(("images", "audio", "language")))


def test_mock_source_feeds_the_audio_branch_and_blank_audio_feeds_silence():
    audio, language = _av_source("audio", 1, dp=2), _av_source("language")
    clips, texts = audio.next_global_batch(), language.next_global_batch()
    assert set(clips[0]) == {"keys", "audio"} and clips[0]["audio"].shape[0] == 2
    assert audio.last_keys == [["2", "3"], ["6", "7"]]
    assert "audio_answer_position" in texts[0] and "audio" not in texts[0]
    blank = _av_source("audio", 1, dp=2, blank=True).next_global_batch()
    quiet = silence(tiny_cpu().audio)
    assert all(torch.equal(clip, quiet) for clip in blank[0]["audio"])
    assert not torch.equal(clips[0]["audio"][0], quiet)
    plain = _mock_source("language", 0, dp=1).next_global_batch()  # no audio branch: no field
    assert "audio_answer_position" not in plain[0]


def test_build_branch_data_with_an_audio_branch_and_blank_audio_without_one():
    from megatron_mimo.data.source import build_branch_data

    av = apply_overrides(tiny_cpu(), {"images_parallel.dp": 1, "audio_parallel.offset": 1,
                                      "data.blank_audio": True})
    assert av.branches == ("images", "audio", "language")
    clips = build_branch_data(av, "audio", 0).next_global_batch()[0]["audio"]
    assert torch.equal(clips, silence(av.audio).expand_as(clips))
    texts = build_branch_data(av, "language", 0).next_global_batch()[0]
    assert "audio_answer_position" in texts
    with pytest.raises(ConfigError, match="data.blank_audio .* has no audio branch: drop the flag"):
        apply_overrides(tiny_cpu(), {"data.blank_audio": True})


WORDS = WordTokenizer.from_captions(["image seven tone three"])
"""Ids: <bos> 0, <eos> 1, <pad> 2, image 3, seven 4, tone 5, three 6."""


def test_layout_puts_the_audio_slots_right_after_the_image_slots():
    layout = SequenceLayout.for_tokenizer(WORDS, 14, 2, 255, num_audio_tokens=3,
                                          audio_token_id=254)
    ids = WORDS.encode("image seven tone three")
    out = layout.build(ids, "k", answer_index=1, audio_answer_index=3)
    assert out["input_ids"].tolist() == [0, 255, 255, 254, 254, 254, 3, 4, 5, 6, 1, 2, 2, 2]
    assert out["labels"].tolist() == out["input_ids"].roll(-1).tolist()
    covered = [int(out["labels"][p]) for p in range(14) if out["loss_mask"][p] == 1]
    assert covered == [3, 4, 5, 6, 1]  # the caption and EOS, never a slot
    assert int(out["labels"][out["answer_position"]]) == 4  # seven: the image's word
    assert int(out["labels"][out["audio_answer_position"]]) == 6  # three: the tone's word
    plain = SequenceLayout.for_tokenizer(WORDS, 14, 2, 255).build(ids, "k", 1)
    assert "audio_answer_position" not in plain
    assert plain["input_ids"].tolist() == [0, 255, 255, 3, 4, 5, 6, 1, 2, 2, 2, 2, 2, 2]
    with pytest.raises(DataError, match="needs 11 tokens with the image and the clip, "
                                        "--seq-length is 10") as error:
        SequenceLayout.for_tokenizer(WORDS, 10, 2, 255, 3, 254).build(ids, "k", 1, 3)
    assert "\n" not in str(error.value)


def test_answer_words_are_found_by_their_index_in_the_caption():
    assert word_token_index(WORDS, "image seven tone three", 1) == ([3, 4, 5, 6], 1)
    assert word_token_index(WORDS, "image  seven tone three ", 3, "k")[1] == 3
    with pytest.raises(DataError, match="sample k: answer word 4 of caption .* does not exist"):
        word_token_index(WORDS, "image seven tone three", 4, "k")
