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


def split_size(root: Path, split: str) -> int:
    """Samples of one split part, by the shard-path convention ``<split>/...`` of our datasets
    (datasets with other split rules report 0: nothing is checked against it)."""
    return sum(n for name, n in shard_counts(root).items() if name.startswith(f"{split}/"))
