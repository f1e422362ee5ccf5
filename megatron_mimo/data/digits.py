"""``megatron-mimo data prepare-digits OUT``: scikit-learn's bundled handwritten digits as an
Energon WebDataset, prepared in seconds without a download.

Why digits: 1,797 real 8x8 scans ship inside scikit-learn, so a fresh clone can train on real
image-caption data offline; and a caption that names the digit ("the digit seven") can only be
predicted from the image, which makes held-out accuracy a proof that the image reaches the
language model.

What it writes (every file programmatically, no prompt)::

    OUT/train/shard_000000.tar ...   PNG (resized to --image-size, grey) + caption per sample
    OUT/val/shard_000000.tar
    OUT/tokenizer.json               the words the captions need (data/tokenizer.py)
    OUT/.nv-meta/                    Energon's index (prepare_dataset) and dataset.yaml

``--vqa`` writes instruction data instead (Energon's ``VQASample``, trained with the loss on the
answers only, :mod:`megatron_mimo.data.vqa`): per sample a question of one of three kinds drawn
with a fixed seed (:data:`QUESTIONS`) and its answer, as ``<key>.json``
(``{"question": ..., "answers": [...]}``) beside the PNG; same split and images; the word list
holds every question and answer word.

``--audio`` pairs every digit image with the telephone (DTMF) tone of another, independently
drawn digit (:func:`audio_samples`): ``<key>.wav`` (mono 16-bit PCM at the default audio
encoder's sample rate, a random length from :data:`MIN_TONE_SECONDS` to the encoder's longest
clip, with noise) and ``<key>.json`` (``{"caption": "image seven tone three", "image_answer": 1,
"audio_answer": 3}``: the caption and which of its words each input decides), our
``AudioCaptionSample`` (:mod:`megatron_mimo.data.energon_samples`); same split and images.

After Energon indexes the shards, its per-shard counts are compared with what was written: a shard
Energon read only partly (a truncated tar) is an error, never a smaller dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_mimo.config.models import AudioModelConfig
from megatron_mimo.data.audio import dtmf, wav_bytes
from megatron_mimo.data.checks import (
    AUDIO_DATASET_YAML_TEXT,
    DATASET_YAML_TEXT,
    VQA_DATASET_YAML_TEXT,
    check_prepared,
    write_dataset_yaml,
)
from megatron_mimo.data.tokenizer import WordTokenizer
from megatron_mimo.errors import DataError

logger = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val")
QUESTIONS = ("which digit is this ?", "is this digit even ?", "what is this digit plus one ?")
"""The three question kinds of ``--vqa``; every one is answered from the image alone."""
QUESTION_SEED_OFFSET = 1
"""Question kinds are drawn with ``Random(seed + 1)``: not the sample order's stream."""
TONE_STREAM = 2
"""Tones are drawn from ``numpy.random.default_rng([seed, 2])``: a stream of their own, so the
tone's digit is independent of the image's (and of the sample order)."""
MIN_TONE_SECONDS = 0.1
"""Shortest tone written; the longest is the audio encoder's longest clip."""
TONE_NOISE = 0.05
"""Standard deviation of the Gaussian noise on every tone (each sine peaks at 0.4)."""


def caption_of(label: int) -> str:
    """The caption of a digit image: its last word is the answer the model must read off."""
    return f"the digit {DIGIT_WORDS[label]}"


def answer_of(kind: int, label: int) -> str:
    """The answer to question ``QUESTIONS[kind]`` about digit ``label``."""
    if kind == 0:
        return DIGIT_WORDS[label]
    if kind == 1:
        return "yes" if label % 2 == 0 else "no"
    return DIGIT_WORDS[(label + 1) % len(DIGIT_WORDS)]


def audio_caption_of(label: int, tone: int) -> str:
    """The caption of a digit image with a tone: word 1 is the image's answer, word 3 the
    tone's (neither can be guessed from the other input)."""
    return f"image {DIGIT_WORDS[label]} tone {DIGIT_WORDS[tone]}"


def audio_words() -> list[str]:
    """Every word an audio caption may use, whichever tones the seed draws (the word list)."""
    return [audio_caption_of(d, d) for d in range(len(DIGIT_WORDS))]


def vqa_words() -> list[str]:
    """Every question and answer text, whichever kinds the seed draws (the word list)."""
    return [*QUESTIONS, *DIGIT_WORDS, "yes", "no"]


def png_bytes(scan, image_size: int) -> bytes:
    """An 8x8 scan (values 0-16) as a grey PNG of ``image_size`` x ``image_size`` pixels."""
    from PIL import Image

    pixels = (scan.astype("float32") * (255.0 / 16.0)).clip(0, 255).astype("uint8")
    image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


Sample = tuple[str, dict[str, bytes]]
"""A sample's key and its members by extension (``{"png": ..., "txt": ...}``)."""


def write_shards(root: Path, split: str, samples: list[Sample],
                 shard_size: int) -> dict[str, int]:
    """Write ``samples`` into tar shards; return {relative shard path: count}."""
    (root / split).mkdir(parents=True, exist_ok=True)
    written = {}
    for start in range(0, len(samples), shard_size):
        name = f"{split}/shard_{start // shard_size:06d}.tar"
        chunk = samples[start:start + shard_size]
        with tarfile.open(root / name, "w") as tar:
            for key, members in chunk:
                for extension, data in members.items():
                    _add_member(tar, f"{key}.{extension}", data)
        written[name] = len(chunk)
    return written


def caption_samples(digits: list, image_size: int) -> list[Sample]:
    """A PNG and a caption per digit."""
    return [(key, {"png": png_bytes(scan, image_size), "txt": caption_of(label).encode()})
            for key, scan, label in digits]


def vqa_samples(digits: list, image_size: int, seed: int) -> list[Sample]:
    """A PNG and a question with its answer per digit; the kind is drawn per sample."""
    kinds = random.Random(seed + QUESTION_SEED_OFFSET)
    samples = []
    for key, scan, label in digits:
        kind = kinds.randrange(len(QUESTIONS))
        text = {"question": QUESTIONS[kind], "answers": [answer_of(kind, label)]}
        samples.append((key, {"png": png_bytes(scan, image_size),
                              "json": json.dumps(text).encode()}))
    return samples


def audio_samples(digits: list, image_size: int, seed: int,
                  audio: AudioModelConfig | None = None) -> list[Sample]:
    """A PNG, a DTMF tone and a caption with both answers per digit; the tone's digit, length
    and noise come from the tone stream (:data:`TONE_STREAM`), at the sizes of ``audio``
    (default: :class:`AudioModelConfig`'s, the ``tiny_cpu_av`` encoder's)."""
    cfg = audio or AudioModelConfig()
    tones = np.random.default_rng([seed, TONE_STREAM])
    shortest = min(round(MIN_TONE_SECONDS * cfg.sample_rate), cfg.max_samples)
    samples = []
    for key, scan, label in digits:
        tone = int(tones.integers(len(DIGIT_WORDS)))
        length = int(tones.integers(shortest, cfg.max_samples + 1))
        clip = dtmf(tone, cfg.sample_rate, length, tones, TONE_NOISE)
        text = {"caption": audio_caption_of(label, tone), "image_answer": 1, "audio_answer": 3}
        samples.append((key, {"png": png_bytes(scan, image_size),
                              "wav": wav_bytes(clip, cfg.sample_rate),
                              "json": json.dumps(text).encode()}))
    return samples


def index_shards(root: Path, written: dict[str, int]) -> None:
    """Energon's ``prepare_dataset`` without prompts; its chatter goes to the debug log."""
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory

    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            BaseWebdatasetFactory.prepare_dataset(
                root, list(written), split_parts_patterns=[(s, f"{s}/.*") for s in SPLITS],
                shuffle_seed=None, workers=2)
    except Exception as error:  # noqa: BLE001 - Energon raises bare assertions on bad shards
        raise DataError(f"{root}: Energon could not index the shards: "
                        f"{type(error).__name__}: {error}") from error
    logger.debug("energon prepare: %s", chatter.getvalue().strip())


def load_digits(seed: int) -> list[tuple[str, object, int]]:
    """scikit-learn's digits as (key, 8x8 scan, label), shuffled with ``seed`` (the bundled
    order cycles through the classes)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DataError("prepare-digits needs scikit-learn: pip install "
                        "'megatron-mimo[data]'") from error
    bunch = sklearn_digits()
    order = list(range(len(bunch.target)))
    random.Random(seed).shuffle(order)
    return [(f"digit{i:04d}", bunch.images[i], int(bunch.target[i])) for i in order]


def prepare_digits(out: Path, image_size: int = 32, val_samples: int = 297,
                   shard_size: int = 250, seed: int = 0, vqa: bool = False,
                   audio: bool = False) -> dict[str, int]:
    """Write the digits dataset to ``out`` (``vqa``: as questions and answers; ``audio``: each
    image with the tone of another digit); return the sample count per split.

    Everything is written to ``OUT.partial`` and renamed at the end: an interrupted run leaves
    no half dataset behind under ``OUT`` (``make train`` prepares again next time)."""
    out = Path(out)
    if vqa and audio:
        raise DataError("--vqa and --audio are two kinds of dataset: choose one")
    if out.exists():
        raise DataError(f"{out} already exists: choose another folder or delete it")
    digits = load_digits(seed)
    if not 0 < val_samples < len(digits):
        raise DataError(f"--val-samples must lie in 1..{len(digits) - 1}, got {val_samples}")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if vqa:
        samples, words = vqa_samples(digits, image_size, seed), vqa_words()
        dataset_yaml = VQA_DATASET_YAML_TEXT
    elif audio:
        samples, words = audio_samples(digits, image_size, seed), audio_words()
        dataset_yaml = AUDIO_DATASET_YAML_TEXT
    else:
        samples = caption_samples(digits, image_size)
        words = [caption_of(label) for _, _, label in digits]
        dataset_yaml = DATASET_YAML_TEXT
    counts = _write_dataset(staging, samples, WordTokenizer.from_captions(words), val_samples,
                            shard_size, dataset_yaml)
    staging.rename(out)
    return counts


def _write_dataset(out: Path, samples: list[Sample], tokenizer: WordTokenizer, val_samples: int,
                   shard_size: int, dataset_yaml: str) -> dict[str, int]:
    """Shards, word list, Energon's index and ``dataset.yaml`` (which sample type)."""
    parts = {"val": samples[:val_samples], "train": samples[val_samples:]}
    written = {}
    for split in SPLITS:
        written.update(write_shards(out, split, parts[split], shard_size))
    tokenizer.save(out)
    index_shards(out, written)
    write_dataset_yaml(out, dataset_yaml)
    check_prepared(out, written)
    return {split: len(parts[split]) for split in SPLITS}


def build_parser() -> argparse.ArgumentParser:
    """``megatron-mimo data ...`` (runs in one process; no torchrun)."""
    parser = argparse.ArgumentParser(prog="megatron-mimo data",
                                     description="Prepare training data (no torchrun needed).")
    commands = parser.add_subparsers(dest="command", required=True)
    digits = commands.add_parser("prepare-digits", help="scikit-learn's digits as an Energon dataset")
    digits.add_argument("out", type=Path, help="folder to create")
    digits.add_argument("--image-size", type=int, default=32,
                        help="PNG side in pixels: the encoder's --encoder-image-size (default 32)")
    digits.add_argument("--val-samples", type=int, default=297,
                        help="held-out samples (default 297; the other 1,500 train)")
    digits.add_argument("--shard-size", type=int, default=250, help="samples per tar shard")
    digits.add_argument("--seed", type=int, default=0, help="shuffle seed of the sample order")
    kind = digits.add_mutually_exclusive_group()
    kind.add_argument("--vqa", action="store_true",
                      help="write questions and answers (Energon VQASample: the loss covers "
                           "the answers only) instead of captions")
    kind.add_argument("--audio", action="store_true",
                      help="pair each image with the telephone (DTMF) tone of an independently "
                           "drawn digit: 'image seven tone three' (for a job with an audio "
                           "branch, e.g. --config tiny_cpu_av)")
    return parser


def data_main(argv: Sequence[str]) -> int:
    """Entry point of ``megatron-mimo data``; raises DataError on bad input."""
    args = build_parser().parse_args(argv)
    counts = prepare_digits(args.out, args.image_size, args.val_samples, args.shard_size,
                            args.seed, args.vqa, args.audio)
    kind = "VQA" if args.vqa else "audio" if args.audio else "caption"
    print(f"prepared {args.out}: " + ", ".join(f"{n} {split}" for split, n in counts.items())
          + f" {kind} samples, {args.image_size}x{args.image_size} pixels")
    return 0
