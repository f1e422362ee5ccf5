"""What an Energon dataset folder must hold before a loader touches it, checked up front.

Energon fails late or not at all on damaged data (``../docs/data.md``, "What Energon does not
check"): a missing ``.nv-meta`` is a ``ValueError`` deep in the loader, a tar truncated after
preparation surfaces only when iteration reaches it, and ``prepare_dataset`` on a truncated tar
silently indexes the readable half. These checks turn each case into one :class:`DataError`
naming the file, before training starts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from megatron_mimo.errors import DataError

META = ".nv-meta"
INFO_FILENAME = ".info.json"
SPLIT_FILENAME = "split.yaml"
DATASET_YAML = "dataset.yaml"
DATASET_YAML_TEXT = """\
sample_type:
  __module__: megatron.energon
  __class__: CaptioningSample
field_map:
  image: png
  caption: txt
"""
"""Energon's own image-caption sample type: any dataset prepared this way (``energon prepare``
with these fields) trains, not only ours."""
VQA_DATASET_YAML_TEXT = """\
sample_type:
  __module__: megatron.energon
  __class__: VQASample
field_map:
  image: png
  context: json[question]
  answers: json[answers]
"""
"""Energon's own VQA sample type: the question and the list of answers come from one JSON
member per sample (``{"question": ..., "answers": [...]}``)."""
AUDIO_DATASET_YAML_TEXT = """\
sample_type:
  __module__: megatron_mimo.data.energon_samples
  __class__: AudioCaptionSample
field_map:
  image: png
  audio: wav
  caption: json[caption]
  image_answer: json[image_answer]
  audio_answer: json[audio_answer]
"""
"""Our image + clip + caption sample type: the clip is a WAV member (decoded by the task
encoder, not by Energon), the caption and the indices of its two answer words come from one
JSON member (``{"caption": "image seven tone three", "image_answer": 1, "audio_answer": 3}``)."""
SAMPLE_KINDS = {"CaptioningSample": "caption", "VQASample": "VQA",
                "AudioCaptionSample": "audio"}
"""What the task encoder does with each sample type ``dataset.yaml`` may declare."""


def write_dataset_yaml(root: Path, text: str = DATASET_YAML_TEXT) -> Path:
    """``.nv-meta/dataset.yaml`` (``prepare_dataset`` does not write it); ``text``: which
    sample type the dataset declares (captions by default)."""
    path = Path(root) / META / DATASET_YAML
    path.write_text(text)
    return path


def shard_counts(root: Path) -> dict[str, int]:
    """Samples per shard as Energon indexed them (``.nv-meta/.info.json``)."""
    path = Path(root) / META / INFO_FILENAME
    if not (Path(root) / META).is_dir():
        raise DataError(f"{Path(root) / META} is missing: {root} is not a prepared Energon "
                        f"dataset (run `megatron-mimo data prepare-digits {root}` or "
                        f"`energon prepare {root}`)")
    try:
        counts = json.loads(path.read_text())["shard_counts"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: cannot read the shard counts ({type(error).__name__}: "
                        f"{error}); prepare the dataset again") from error
    return {name: int(n) for name, n in counts.items()}


def check_prepared(root: Path, written: dict[str, int]) -> None:
    """Energon's per-shard counts must equal what was written (no sample lost in indexing)."""
    indexed = shard_counts(root)
    for name, count in written.items():
        if indexed.get(name) != count:
            raise DataError(f"{Path(root) / name}: wrote {count} samples but Energon indexed "
                            f"{indexed.get(name, 0)} (a damaged tar?)")


def _check_shard(root: Path, name: str, count: int) -> None:
    """The shard and its ``.tar.idx`` exist and the tar is as long as the index says."""
    shard = Path(root) / name
    index = shard.with_suffix(".tar.idx")
    if not shard.is_file():
        raise DataError(f"{shard} is missing ({count} samples indexed in {META}/{INFO_FILENAME})")
    if not index.is_file():
        raise DataError(f"{index} is missing: prepare the dataset again")
    data = index.read_bytes()
    offsets = struct.unpack(f"{len(data) // 8}Q", data[: len(data) // 8 * 8])
    if len(offsets) < count:
        raise DataError(f"{index} lists {len(offsets)} samples, {META}/{INFO_FILENAME} says "
                        f"{count}: prepare the dataset again")
    size = shard.stat().st_size
    if offsets and offsets[-1] > size:
        raise DataError(f"{shard} is truncated: {size} bytes, its index needs {offsets[-1]}")


def check_dataset(root: Path) -> dict[str, int]:
    """Check a dataset folder before loading; return its shard counts."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-path {root} does not exist")
    counts = shard_counts(root)
    for required in (SPLIT_FILENAME, DATASET_YAML):
        if not (root / META / required).is_file():
            raise DataError(f"{root / META / required} is missing: prepare the dataset again")
    for name, count in counts.items():
        _check_shard(root, name, count)
    return counts


def sample_type(root: Path) -> str:
    """The class name of the sample type ``.nv-meta/dataset.yaml`` declares."""
    import yaml

    path = Path(root) / META / DATASET_YAML
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise DataError(f"{path}: cannot read it ({type(error).__name__}: {reason})") from None
    declared = data.get("sample_type", data) if isinstance(data, dict) else None
    name = declared.get("__class__") if isinstance(declared, dict) else None
    if not isinstance(name, str):
        raise DataError(f"{path}: declares no sample type (sample_type: __class__)")
    return name


def check_sample_kind(root: Path, audio: bool) -> str:
    """The dataset's kind (:data:`SAMPLE_KINDS`); audio samples need a job with an audio
    branch and such a job needs audio samples (other samples have no clip to feed it, and an
    audio sample's clip would be dropped). Returns the sample type's name."""
    name = sample_type(root)
    kind = SAMPLE_KINDS.get(name, name)
    where = f"--data-path {root} holds {kind} samples ({META}/{DATASET_YAML}: {name})"
    if kind == "audio" and not audio:
        raise DataError(f"{where} but the job has no audio branch: give it one (--audio-tp, "
                        f"--audio-dp, --audio-offset; e.g. --config tiny_cpu_av) or train on "
                        f"caption or VQA samples")
    if audio and kind != "audio":
        raise DataError(f"{where} but the job has an audio branch, which needs audio samples "
                        f"(AudioCaptionSample, e.g. `megatron-mimo data prepare-digits OUT "
                        f"--audio`): train on such a dataset or without the audio branch")
    return name


def split_size(root: Path, split: str) -> int:
    """Samples of one split part, by the shard-path convention ``<split>/...`` of our datasets
    (datasets with other split rules report 0: nothing is checked against it)."""
    return sum(n for name, n in shard_counts(root).items() if name.startswith(f"{split}/"))
