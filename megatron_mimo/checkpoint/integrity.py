"""Checksums of every file of a checkpoint: computed when it is written, kept in the manifest,
checked before a load and by ``megatron-mimo checkpoint verify``.

A flipped bit inside a shard otherwise loads silently. xxh3-128 hashes at memory speed, so the
cost is one read of the file, taken while it is still in the page cache: each rank hashes the
shards it wrote right after writing them (in the background writer for an async save) and
leaves the result in a small side file that the publishing rank folds into the manifest.
megatron-core's own ``verify_integrity`` uses SHA-256 on one rank over every file, which at
production size costs more than the save itself.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any

import xxhash

logger = logging.getLogger(__name__)

ALGORITHM = "xxh3_128"
"""Hash of every file, as named in the manifest."""
WINDOW_BYTES = 64 << 20
"""Bytes of a file mapped at once (a multiple of every platform's mapping granularity)."""
CHUNK_BYTES = 8 << 20
"""Read size where a file cannot be mapped: one reused buffer, no resident memory added."""
BACKGROUND_NICENESS = 10
"""How much lower the CPU priority of the checkpoint's threads (the writer, a load's hashing) is
than their rank's. The ranks and these threads share the cores: a rank still starting its own
save, stepping while the shards are written, or reading the shards of a load must not wait for
them (on 2 cores with 4 ranks, equal priority let the writers double one rank's share of the
stall; a load's hashing, left equal, slowed the ranks that read the most)."""
SIDECAR_PREFIX = ".checksums_rank"
"""Side files ``.checksums_rank<R>.json`` a writer leaves in the staging directory."""


def lower_priority() -> None:
    """Lower this thread's CPU priority (Linux schedules threads one by one; elsewhere no-op)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
        except OSError as error:  # e.g. a seccomp profile without setpriority
            logger.debug("could not lower a checkpoint thread's priority: %s", error)


def file_checksum(path: Path) -> dict[str, Any]:
    """``{"xxh3_128": hex digest, "bytes": size}`` of one file.

    The file is hashed through windows of :data:`WINDOW_BYTES` mapped in turn: the hash reads
    the page cache in place, without the copy into a buffer a ``read`` makes (measured: 1.6x
    faster at 1.3 GB), and no more than one window is ever resident."""
    digest = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as stream:
        size = os.fstat(stream.fileno()).st_size
        try:
            for offset in range(0, size, WINDOW_BYTES):
                with mmap.mmap(stream.fileno(), min(WINDOW_BYTES, size - offset),
                               access=mmap.ACCESS_READ, offset=offset) as window:
                    digest.update(window)
        except (OSError, ValueError):  # a filesystem that cannot map files: read them
            digest = xxhash.xxh3_128()
            _hash_by_reading(stream, digest)
    return {ALGORITHM: digest.hexdigest(), "bytes": size}


def _hash_by_reading(stream: Any, digest: Any) -> None:
    stream.seek(0)
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    while read := stream.readinto(buffer):
        digest.update(view[:read])


def checksums(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Checksums of ``names`` (relative to ``directory``)."""
    return {name: file_checksum(Path(directory) / name) for name in names}


def write_sidecar(directory: Path, rank: int, paths: list[str]) -> None:
    """Hash the files this rank wrote and leave the result for the publishing rank."""
    names = [Path(p).name for p in paths]
    side = Path(directory) / f"{SIDECAR_PREFIX}{rank}.json"
    side.write_text(json.dumps(checksums(directory, names)))


def collect_sidecars(directory: Path) -> dict[str, dict[str, Any]]:
    """Merge and remove every side file of a staging directory."""
    merged: dict[str, dict[str, Any]] = {}
    for side in sorted(Path(directory).glob(SIDECAR_PREFIX + "*.json")):
        merged.update(json.loads(side.read_text()))
        side.unlink()
    return merged


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files ``rank`` checks: every file is checked by exactly one rank (largest first,
    dealt round-robin, so each rank reads about the same number of bytes)."""
    return names[rank::world_size]


def problems(directory: Path, expected: dict[str, dict[str, Any]],
             names: list[str] | None = None) -> list[str]:
    """One line per file of ``names`` (default: all) whose bytes differ from the manifest."""
    directory = Path(directory)
    found = []
    for name in names if names is not None else sorted(expected):
        path, want = directory / name, expected[name]
        if not path.exists():
            found.append(f"{path} is missing (listed in the manifest's checksums)")
            continue
        got = file_checksum(path)
        if got["bytes"] != want["bytes"]:
            found.append(f"{path} has {got['bytes']} bytes, the manifest says {want['bytes']}")
        elif got[ALGORITHM] != want[ALGORITHM]:
            found.append(f"{path} is corrupt: its {ALGORITHM} checksum {got[ALGORITHM]} differs "
                         f"from the manifest's {want[ALGORITHM]}")
    return found


def by_size(expected: dict[str, dict[str, Any]]) -> list[str]:
    """File names, largest first (the order :func:`share` deals them in)."""
    return sorted(expected, key=lambda name: (-expected[name]["bytes"], name))


class Verification:
    """:func:`problems` of some files, found by a thread while the caller goes on (the load
    reads the shards meanwhile; hashing releases the GIL)."""

    def __init__(self, directory: Path, expected: dict[str, dict[str, Any]],
                 names: list[str]) -> None:
        self.found: list[str] = []
        self.thread = threading.Thread(target=self._run, args=(directory, expected, names),
                                       name="checkpoint-verify", daemon=True)
        self.thread.start()

    def _run(self, directory: Path, expected: dict[str, dict[str, Any]], names: list[str]) -> None:
        lower_priority()
        try:
            self.found = problems(directory, expected, names)
        except OSError as error:
            self.found = [f"cannot read {getattr(error, 'filename', None) or directory} "
                          f"to verify it ({error.strerror or error})"]

    def result(self) -> list[str]:
        """The problems found (waits for the thread)."""
        self.thread.join()
        return self.found
