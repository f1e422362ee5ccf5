"""On-disk layout of checkpoints, Megatron-compatible, with atomic publish (pure Python).

    <save>/latest_checkpointed_iteration.txt     the iteration to resume from
    <save>/iter_0000NNN/                         one complete checkpoint
        common.pt  metadata.json  .metadata  __*_*.distcp  mimo_manifest.json
    <save>/.tmp_iter_0000NNN/                    a checkpoint being written (never loaded)

A checkpoint is written into the temporary directory, finalised by every rank, renamed into
place, and only then is the tracker rewritten (itself through a temporary file and a rename).
A crash at any point leaves the tracker on the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MANIFEST_FILENAME = "mimo_manifest.json"
TMP_PREFIX = ".tmp_"


def iteration_dirname(iteration: int) -> str:
    """Megatron's directory name of one iteration's checkpoint."""
    return f"iter_{iteration:07d}"


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    """Final directory of ``iteration`` under ``root``."""
    return Path(root) / iteration_dirname(iteration)


def staging_dir(root: str | Path, iteration: int) -> Path:
    """Temporary directory a checkpoint is written into before it is published."""
    return Path(root) / (TMP_PREFIX + iteration_dirname(iteration))


def read_tracker(root: str | Path) -> int | None:
    """Iteration named by the tracker file, or None when there is none (fresh start)."""
    path = Path(root) / TRACKER_FILENAME
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path} holds {text!r}, not an iteration number")
    return int(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def prepare_staging(root: str | Path, iteration: int) -> Path:
    """Create an empty staging directory (removing a leftover from a crashed save)."""
    staging = staging_dir(root, iteration)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(root: str | Path, iteration: int) -> Path:
    """Move the finished staging directory into place, then point the tracker at it."""
    root = Path(root)
    staging, final = staging_dir(root, iteration), checkpoint_dir(root, iteration)
    if final.exists():  # re-save of the same iteration: the new one wins
        old = root / (TMP_PREFIX + "old_" + final.name)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    _fsync_dir(root)
    write_atomic(root / TRACKER_FILENAME, f"{iteration}\n")
    return final


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the small JSON manifest next to the shards (human-readable, checked on load)."""
    write_atomic(directory / MANIFEST_FILENAME, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(directory: Path) -> dict[str, Any]:
    """Manifest of a checkpoint directory."""
    path = directory / MANIFEST_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a megatron-mimo checkpoint")
    return json.loads(path.read_text())


def is_complete(directory: Path) -> bool:
    """A published checkpoint has megatron's metadata and our manifest."""
    return (directory / "metadata.json").exists() and (directory / MANIFEST_FILENAME).exists()
