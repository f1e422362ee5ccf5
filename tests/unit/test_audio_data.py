"""Image + clip data through Energon, without a process group: ``prepare-digits --audio``, our
``AudioCaptionSample`` and its task encoder, the dataset kind against the job's branches, bad
clips, and three branches reading the same samples (``docs/data.md``, "Audio")."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.energon")
pytest.importorskip("sklearn")

from megatron_mimo.config.cli import apply_overrides  # noqa: E402
from megatron_mimo.config.models import AudioModelConfig  # noqa: E402
from megatron_mimo.config.presets import tiny_cpu  # noqa: E402
from megatron_mimo.data.audio import (  # noqa: E402
    dtmf_frequencies,
    log_mel,
    mel_band_of,
    num_frames,
    read_wav,
    silence,
    wav_bytes,
)
from megatron_mimo.data.checks import check_dataset, sample_type  # noqa: E402
from megatron_mimo.data.digits import DIGIT_WORDS, load_digits  # noqa: E402
from megatron_mimo.data.energon import (  # noqa: E402
    ViewSpec,
    build_val_loader,
    next_batch,
    sample_format_for,
)
from megatron_mimo.data.loader_state import LoaderRecord  # noqa: E402
from megatron_mimo.data.source import EnergonSource, build_branch_data, text_fields  # noqa: E402
from megatron_mimo.data.tokenizer import WordTokenizer  # noqa: E402
from megatron_mimo.data.views import assign_branch_views  # noqa: E402
from megatron_mimo.errors import DataError  # noqa: E402
from tests.damage import corrupt_first  # noqa: E402

AUDIO = AudioModelConfig()
"""prepare-digits writes tones for the default encoder: 8 kHz, at most 3,968 samples."""
IMAGE_SIZE, SEQ, IMAGE_TOKENS, IMAGE_TOKEN_ID, AUDIO_TOKEN_ID = 16, 40, 4, 255, 254
TRAIN, VAL = 1500, 297


@pytest.fixture(scope="module")
def av_digits(digits_av_dataset) -> Path:
    """``prepare_digits(root, audio=True)``, prepared once per session (``tests/conftest.py``)."""
    return digits_av_dataset


def fmt(root: Path):
    return sample_format_for(root, IMAGE_SIZE, SEQ, IMAGE_TOKENS, IMAGE_TOKEN_ID, audio=AUDIO,
                             audio_token_id=AUDIO_TOKEN_ID)


def view(root: Path, v: int = 0, n: int = 1, batch: int = 4) -> ViewSpec:
    return ViewSpec(root, v, n, 0, 1234, batch)


def members(root: Path) -> dict[str, dict[str, bytes]]:
    """Every sample's members, by key and extension, read straight from the tars."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(root.glob("*/shard_*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def tone_digit(wav: bytes) -> int:
    """The keypad digit whose two frequencies' mel bands hold the most energy."""
    clip = read_wav(wav, "k", AUDIO.sample_rate)
    energy = log_mel(clip, AUDIO, "k")[:, :num_frames(clip.numel(), AUDIO)].mean(1)

    def score(d: int) -> float:
        return float(sum(energy[mel_band_of(f, AUDIO)] for f in dtmf_frequencies(d)))

    return max(range(10), key=score)


def test_prepare_digits_audio_pairs_each_image_with_an_independent_tone(av_digits):
    counts = check_dataset(av_digits)
    assert sum(n for name, n in counts.items() if name.startswith("train/")) == TRAIN
    assert sum(n for name, n in counts.items() if name.startswith("val/")) == VAL
    assert sample_type(av_digits) == "AudioCaptionSample"
    labels = {key: label for key, _, label in load_digits(0)}
    samples = members(av_digits)
    assert len(samples) == TRAIN + VAL
    pairs, lengths = [], []
    for key, parts in samples.items():
        assert set(parts) == {"png", "wav", "json"}
        text = json.loads(parts["json"])
        words = text["caption"].split()
        assert (words[0], words[2], text["image_answer"], text["audio_answer"]) == (
            "image", "tone", 1, 3)
        assert words[1] == DIGIT_WORDS[labels[key]]  # the image's digit, as for captions
        pairs.append((DIGIT_WORDS.index(words[1]), DIGIT_WORDS.index(words[3])))
        with wave.open(io.BytesIO(parts["wav"])) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (
                1, 2, AUDIO.sample_rate)
            lengths.append(wav.getnframes())
    assert round(0.1 * AUDIO.sample_rate) <= min(lengths) and max(lengths) <= AUDIO.max_samples
    assert max(lengths) - min(lengths) > AUDIO.max_samples // 2  # random lengths
    # the tone's digit is drawn on its own: every tone with every image digit, equal by chance
    assert sum(image == tone for image, tone in pairs) < len(pairs) // 5
    assert {tone for image, tone in pairs if image == 0} == set(range(10))
    # the caption's tone word is what the clip sounds
    for key in sorted(samples)[:40]:
        assert DIGIT_WORDS[tone_digit(samples[key]["wav"])] == json.loads(
            samples[key]["json"])["caption"].split()[3], key
    words = WordTokenizer.load(av_digits).words
    assert set(words) == {"<bos>", "<eos>", "<pad>", "image", "tone", *DIGIT_WORDS}


def test_the_loader_decodes_clips_itself_and_fills_both_answers(av_digits):
    """Energon would open a WAV with PyAV (not installed here): the task encoder reads it."""
    tokenizer = WordTokenizer.load(av_digits)
    captions = {key: json.loads(parts["json"])["caption"]
                for key, parts in members(av_digits).items()}
    keys = []
    for batch in build_val_loader(view(av_digits, batch=33), fmt(av_digits)):
        keys += batch["keys"]
        b = len(batch["keys"])
        assert batch["pixels"].shape == (b, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["audio"].shape == (b, AUDIO.num_mel_bins, AUDIO.max_frames)
        assert batch["audio"].dtype == torch.float32
        ids = batch["input_ids"]
        assert (ids[:, 1:1 + IMAGE_TOKENS] == IMAGE_TOKEN_ID).all()
        assert (ids[:, 1 + IMAGE_TOKENS:1 + IMAGE_TOKENS + AUDIO.num_audio_tokens]
                == AUDIO_TOKEN_ID).all()
        rows = torch.arange(b)
        for row, key in enumerate(batch["keys"]):
            words = captions[key].split()
            assert tokenizer.words[batch["labels"][row, batch["answer_position"][row]]] == words[1]
            assert (tokenizer.words[batch["labels"][row, batch["audio_answer_position"][row]]]
                    == words[3])
        assert batch["loss_mask"][rows].sum() == b * 5  # four caption words and EOS
    assert len(keys) == len(set(keys)) == VAL


def test_a_sample_without_a_clip_gets_silence(av_digits):
    for clip in (None, wav_bytes(np.zeros(0), AUDIO.sample_rate)):  # no clip, or zero samples
        sample = fmt(av_digits).encode_audio("k", torch.zeros(3, 8, 8), clip,
                                             "image one tone two", 1, 3)
        assert torch.equal(sample["audio"], silence(AUDIO))


def test_an_undecodable_clip_stops_the_loader_naming_the_sample(av_digits, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(av_digits, copy)
    key = corrupt_first(copy / "val" / "shard_000000.tar", "wav")
    spec = view(copy, batch=VAL)
    with pytest.raises(DataError, match="cannot decode its WAV file") as error:
        next_batch(iter(build_val_loader(spec, fmt(copy))), spec)  # the whole split in 1 batch
    assert f"sample {key}" in str(error.value) and "\n" not in str(error.value)


def av_cfg(data_path: Path, **dps):
    """tiny_cpu with an audio branch on --data-path (images, audio, language DP from ``dps``)."""
    dp = {"images": 1, "audio": 1, "language": 1, **dps}
    offsets = [0, dp["images"], dp["images"] + dp["audio"]]
    return apply_overrides(tiny_cpu(), {
        "images_parallel.dp": dp["images"], "audio_parallel.dp": dp["audio"],
        "audio_parallel.offset": offsets[1], "language_parallel.dp": dp["language"],
        "language_parallel.tp": 1, "language_parallel.offset": offsets[2],
        "training.micro_batch_size": 2 * math.lcm(*dp.values()) // dp["language"],
        "training.global_batch_size": 4 * math.lcm(*dp.values()),
        "data.data_path": str(data_path)})


def test_the_dataset_kind_must_match_the_jobs_branches(av_digits, digits_dataset):
    with pytest.raises(DataError) as error:  # an audio dataset, no audio branch
        build_branch_data(apply_overrides(tiny_cpu(), {"data.data_path": str(av_digits)}),
                          "language", 0)
    assert ("holds audio samples (.nv-meta/dataset.yaml: AudioCaptionSample) but the job has "
            "no audio branch") in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError) as error:  # caption samples for an audio branch
        build_branch_data(av_cfg(digits_dataset), "audio", 0)
    assert ("holds caption samples (.nv-meta/dataset.yaml: CaptioningSample) but the job has "
            "an audio branch") in str(error.value) and "\n" not in str(error.value)
    source = build_branch_data(av_cfg(av_digits), "audio", 0)  # the matching pair trains
    assert set(source.next_global_batch()[0]) == {"keys", "audio"}
    source.close()


def test_the_word_list_must_leave_both_placeholders_free(av_digits):
    words = len(WordTokenizer.load(av_digits).words)
    sample_format_for(av_digits, IMAGE_SIZE, SEQ, IMAGE_TOKENS, words + 1, audio=AUDIO,
                      audio_token_id=words)
    with pytest.raises(DataError, match=f"ids from {words - 1} up are reserved for the image and "
                                        f"audio placeholders"):
        sample_format_for(av_digits, IMAGE_SIZE, SEQ, IMAGE_TOKENS, words + 1, audio=AUDIO,
                          audio_token_id=words - 1)


@pytest.mark.parametrize("images_dp, audio_dp, language_dp", [(1, 2, 3)])
def test_three_branches_read_the_same_samples_in_bridge_order(av_digits, images_dp, audio_dp,
                                                              language_dp):
    """Every DP rank of each branch runs its views; each branch's DP slices concatenated in DP
    order are the same samples, micro-step by micro-step, for every pair of branches."""
    dps = {"images": images_dp, "audio": audio_dp, "language": language_dp}
    job_micro = 2 * math.lcm(*dps.values())

    def branch_keys(branch: str) -> list[list[str]]:
        ranks = []
        for rank in range(dps[branch]):
            a = assign_branch_views(job_micro, dps, dps[branch], rank)
            record = LoaderRecord(str(av_digits), a.num_views, a.views, 0, 1234, a.batch_size)
            specs = [view(av_digits, v, a.num_views, a.batch_size) for v in a.views]
            source = EnergonSource(specs, fmt(av_digits), record, where=f"{branch} DP {rank}",
                                   val_samples=VAL, branch=branch, num_microbatches=2,
                                   global_batch_size=2 * job_micro, blank_images=False,
                                   silence=silence(AUDIO), text_fields=text_fields(tuple(dps)))
            source.next_global_batch()
            ranks.append(source.last_keys)
            source.close()
        return [sum((r[m] for r in ranks), []) for m in range(2)]

    images, audio, language = (branch_keys(b) for b in dps)
    assert images == audio == language
    assert all(len(m) == job_micro == len(set(m)) for m in images)


def test_blank_audio_feeds_silence_on_real_data(av_digits):
    cfg = apply_overrides(av_cfg(av_digits), {"data.blank_audio": True})
    source = build_branch_data(cfg, "audio", 0)
    clips = source.next_global_batch()[0]["audio"]
    source.close()
    assert torch.equal(clips, silence(cfg.audio).expand_as(clips))
    assert np.isclose(float(clips.mean()), -1.5)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_audio_ranks_loader_state_resumes_exactly(av_digits, workers):
    """Saved as plain types, loaded with weights_only, restored into a fresh source: the next
    micro-batches are the uninterrupted source's (keys and features), with worker processes too
    (the task encoder and its WAV decoder travel to them)."""
    dps = {"images": 1, "audio": 2, "language": 1}

    def source() -> EnergonSource:
        a = assign_branch_views(4, dps, 2, 1)
        record = LoaderRecord(str(av_digits), a.num_views, a.views, workers, 1234, a.batch_size)
        specs = [ViewSpec(av_digits, v, a.num_views, workers, 1234, a.batch_size)
                 for v in a.views]
        return EnergonSource(specs, fmt(av_digits), record, where="audio DP rank 1",
                             val_samples=VAL, branch="audio", num_microbatches=2,
                             global_batch_size=8, blank_images=False)

    straight = source()
    straight.next_global_batch()
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    expected = [straight.next_global_batch() for _ in range(2)]
    buffer.seek(0)
    resumed = source()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    try:
        for batches in expected:
            again = resumed.next_global_batch()
            assert [b["keys"] for b in again] == [b["keys"] for b in batches]
            assert all(torch.equal(x["audio"], y["audio"]) for x, y in zip(again, batches,
                                                                             strict=True))
    finally:
        straight.close()
        resumed.close()
