"""``megatron-mimo checkpoint inspect DIR`` and ``megatron-mimo checkpoint verify DIR``: one
process, no torchrun, no megatron-core import (only torch, to read DCP's ``.metadata``).

DIR is a save directory (the tracker picks the checkpoint) or one ``iter_*`` directory.
``verify`` exits 0 when the checkpoint is complete and every checksum matches, else 1 with one
line per problem; ``inspect`` prints what the checkpoint holds.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_mimo.checkpoint import integrity, storage
from megatron_mimo.errors import CheckpointError


def resolve(path: str | Path) -> Path:
    """The checkpoint directory DIR stands for (a save root: the one its tracker names)."""
    path = Path(path)
    if (path / storage.TRACKER_FILENAME).exists():
        return storage.checkpoint_dir(path, storage.read_tracker(path))
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    return path


def problems(directory: Path) -> list[str]:
    """Every problem of one checkpoint directory, one line each (empty: it is sound)."""
    if not storage.is_complete(directory):
        return [f"{directory} is incomplete: no metadata.json or {storage.MANIFEST_FILENAME}"]
    try:
        manifest = storage.read_manifest(directory)
        storage.check_files(directory)
    except CheckpointError as error:
        return [str(error)]
    expected = manifest.get("checksums")
    if expected is None:
        return [f"{directory / storage.MANIFEST_FILENAME} has no checksums (saved before they "
                f"were added): only the file sizes were checked"]
    return integrity.problems(directory, expected)


def branch_of(key: str, branches: Sequence[str]) -> str:
    """The branch a sharded key belongs to (``language_model.*`` is the language branch)."""
    parts = re.split(r"[./]", key)
    if parts[0] == "language_model":
        return "language"
    return next((part for part in parts if part in branches), "common")


def layout_of_bytes(directory: Path, branches: Sequence[str]) -> dict[str, dict[str, int]]:
    """Bytes per branch and per dtype (tensors) or 'objects', from DCP's ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(directory)).read_metadata()
    sizes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata.get(index.fqn)
        kind = (str(entry.properties.dtype).removeprefix("torch.")
                if isinstance(entry, TensorStorageMetadata) else "objects")
        sizes[branch_of(index.fqn, branches)][kind] += info.length
    return {branch: dict(kinds) for branch, kinds in sorted(sizes.items())}


def describe(directory: Path) -> dict[str, Any]:
    """What ``inspect`` prints, as a dict."""
    import torch

    manifest = storage.read_manifest(directory)
    progress = manifest.get("summary", {})
    common = torch.load(directory / "common.pt", map_location="cpu", weights_only=True)
    return {
        "directory": str(directory), "iteration": manifest["iteration"],
        "megatron_core_version": manifest["megatron_core_version"],
        "layouts": manifest["topology"], "world_size": manifest["world_size"],
        "optimizer_sharding_type": manifest["optimizer_sharding_type"],
        "contents": manifest["contents"], "train_state": progress.get("train_state"),
        "lr_schedule": progress.get("schedulers"),
        "bytes_by_branch_and_dtype": layout_of_bytes(directory, list(manifest["topology"])),
        "files": {name: entry["bytes"] for name, entry in manifest.get("checksums", {}).items()},
        "config": common.get("config"),
    }


def main(argv: Sequence[str]) -> int:
    """``megatron-mimo checkpoint {inspect,verify} DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="megatron-mimo checkpoint",
                                     description="Inspect or verify a checkpoint (one process).")
    parser.add_argument("action", choices=("inspect", "verify"))
    parser.add_argument("directory", help="save directory (--save) or one iter_* directory")
    args = parser.parse_args(argv)
    try:
        directory = resolve(args.directory)
        if args.action == "inspect":
            print(json.dumps(describe(directory), indent=1))
            return 0
        found = problems(directory)
    except Exception as error:  # noqa: BLE001 - a damaged file: one line, exit 1
        print(f"megatron-mimo: error: {' '.join(str(error).split())}")
        return 1
    for line in found:
        print(f"megatron-mimo: error: {line}")
    if not found:
        print(f"ok: {directory}: complete, every checksum matches")
    return 1 if found else 0
