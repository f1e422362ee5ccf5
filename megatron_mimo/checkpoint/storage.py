"""Checkpoint storage, Megatron-compatible: directory names, tracker, manifest, atomic publish,
and a file check that names the broken file before megatron-core reads it.

    <save>/latest_checkpointed_iteration.txt     the iteration to resume from
    <save>/iter_0000NNN/                         one complete checkpoint
        common.pt  metadata.json  .metadata  __*_*.distcp  mimo_manifest.json
    <save>/.tmp_iter_0000NNN/                    a checkpoint being written (never loaded)
    <save>/hf/                                   Hugging Face side files of an imported model

A checkpoint is written into the temporary directory, finalised by every rank, renamed into
place, and only then is the tracker rewritten (itself through a temporary file and a rename).
A crash at any point leaves the tracker on the previous complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from megatron_mimo.errors import CheckpointError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MANIFEST_FILENAME = "mimo_manifest.json"
TMP_PREFIX = ".tmp_"
SIDECAR_DIRNAME = "hf"
"""Folder next to the ``iter_*`` directories holding what an import from Hugging Face keeps for
the export (config.json, tokenizer, tensors the model does not use); not a checkpoint."""


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
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); pass --ckpt-step N to pick a "
                              f"checkpoint") from None
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text[:40]!r}, not an iteration number; fix it or "
                              f"pass --ckpt-step N") from None
    return int(text)


def fsync_path(path: Path | str) -> None:
    """fsync a file or directory by its path (a directory: the names in it are durable)."""
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
    fsync_path(path.parent)


def prepare_staging(root: str | Path, iteration: int) -> Path:
    """Create an empty staging directory (removing a leftover from a crashed save)."""
    staging = staging_dir(root, iteration)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def remove_stale(root: str | Path) -> list[str]:
    """Remove the leftovers of saves and deletions a crash or a full disk interrupted (every
    ``.tmp_*`` entry under ``root``); call once at start, before any save. Return their names."""
    removed = []
    for path in sorted(Path(root).glob(TMP_PREFIX + "*")) if Path(root).is_dir() else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def carry_sidecar(load_root: str | Path, save_root: str | Path) -> bool:
    """Copy ``load_root/hf`` to ``save_root/hf`` unless the latter exists (never overwritten), so
    checkpoints trained from an imported one can still be exported; return whether it copied.
    The copy goes to a ``.tmp_`` sibling first and is renamed into place: a crash leaves no
    partial ``hf/`` (the leftover is removed by :func:`remove_stale`)."""
    source, target = Path(load_root) / SIDECAR_DIRNAME, Path(save_root) / SIDECAR_DIRNAME
    if not source.is_dir() or target.exists():
        return False
    staging = target.with_name(TMP_PREFIX + SIDECAR_DIRNAME)
    if staging.exists():
        shutil.rmtree(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, staging)
    os.replace(staging, target)
    fsync_path(target.parent)
    return True


def published_iterations(root: str | Path) -> list[int]:
    """Iterations of the published checkpoints under ``root``, oldest first."""
    found = []
    for path in Path(root).glob("iter_*"):
        suffix = path.name.removeprefix("iter_")
        if path.is_dir() and suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


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
    fsync_path(root)
    write_atomic(root / TRACKER_FILENAME, f"{iteration}\n")
    return final


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the small JSON manifest next to the shards (human-readable, checked on load)."""
    write_atomic(directory / MANIFEST_FILENAME, json.dumps(manifest, indent=1, sort_keys=True))


MANIFEST_KEYS = ("format", "iteration", "optimizer_sharding_type", "topology", "contents",
                 "world_size", "megatron_core_version")
"""Keys every manifest holds (checked on load)."""


def read_manifest(directory: Path) -> dict[str, Any]:
    """Manifest of a checkpoint directory; CheckpointError naming the file if it is not one."""
    path = Path(directory) / MANIFEST_FILENAME
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {directory} is not a megatron-mimo checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt ({error})") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a megatron-mimo manifest")
    return manifest


def is_complete(directory: Path) -> bool:
    """A published checkpoint has megatron's metadata and our manifest."""
    return (directory / "metadata.json").exists() and (directory / MANIFEST_FILENAME).exists()


def check_files(directory: Path) -> Any:
    """Raise CheckpointError naming the first unreadable, missing or truncated file; return
    DCP's metadata (the load reuses it: parsing it costs as much as reading a big shard).

    Reads DCP's ``.metadata`` (which names every shard file and the byte range of every item in
    it) and ``common.pt``, and compares each shard's size with the end of its last item. Every
    rank runs it on the same files, so every rank fails the same way, at once.
    """
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
        storage = metadata.storage_data
        ends: dict[str, int] = {}
        for info in storage.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as error:  # noqa: BLE001 - any parse failure means the same: corrupt
        raise CheckpointError(f"{directory / '.metadata'} is unreadable "
                              f"({type(error).__name__}: {str(error)[:120]})") from None
    for name, end in sorted(ends.items()):
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path} is missing (named in {directory / '.metadata'})")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(f"{path} is truncated: {size} bytes, its items need {end}")
    _check_common(directory / "common.pt")
    return metadata


def _check_common(path: Path) -> None:
    import torch

    if not path.exists():
        return  # megatron-core >= 0.19 may keep the common state inside the shards
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path} is unreadable as a torch.save file "
                              f"({type(error).__name__})") from None


def _is_disk_full(error: BaseException, root: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or a filesystem left (almost) without space:
    megatron-core's writer keeps only the failure's class ("error: <class 'OSError'>"), and
    torch.save reports a full disk as "enforce fail at inline_container.cc"."""
    usage = shutil.disk_usage(root)
    if usage.free < min(usage.total // 100, 1 << 30):
        return True
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Errno 28" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def describe_write_failure(error: BaseException, root: str | Path, iteration: int) -> str:
    """One line for a failed save: the directory, and whether the disk is full."""
    root = Path(root)
    kept = read_tracker(root) if (root / TRACKER_FILENAME).exists() else None
    after = (f"{root / TRACKER_FILENAME} still names iteration {kept}" if kept is not None
             else "no checkpoint was published")
    if _is_disk_full(error, root):
        free = shutil.disk_usage(root).free
        return (f"cannot save the checkpoint of iteration {iteration} to {root}: the disk is full "
                f"({free} bytes free); {after}; the partial {staging_dir(root, iteration).name} is "
                f"removed at the next start")
    detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return f"cannot save the checkpoint of iteration {iteration} to {root} ({detail}); {after}"


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
