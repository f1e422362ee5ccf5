"""Checkpoint files without a process group: retention choice, checksums, failure wording, flags."""

import collections
import errno

import pytest

from megatron_mimo.checkpoint import integrity, retention, storage
from megatron_mimo.config.cli import config_from_args
from megatron_mimo.errors import ConfigError


def test_retention_keeps_the_newest_k_and_never_the_tracked_one():
    assert retention.to_delete([1, 2, 3, 4, 5], keep_last=2, protected=5) == [1, 2, 3]
    assert retention.to_delete([1, 2, 3, 4, 5], keep_last=2, protected=2) == [1, 3]  # --ckpt-step
    assert retention.to_delete([3], keep_last=1, protected=None) == []


def test_every_file_is_checked_by_exactly_one_rank():
    expected = {f"__{r}_0.distcp": {"bytes": 100 * r, "xxh3_128": "0"} for r in range(7)}
    names = integrity.by_size(expected)
    shares = [integrity.share(names, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(expected)
    assert names[0] == "__6_0.distcp"  # largest first


def test_a_flipped_bit_is_named_with_its_file(tmp_path):
    (tmp_path / "a.distcp").write_bytes(bytes(range(256)) * 64)
    expected = integrity.checksums(tmp_path, ["a.distcp"])
    assert integrity.problems(tmp_path, expected) == []
    data = bytearray((tmp_path / "a.distcp").read_bytes())
    data[5000] ^= 1
    (tmp_path / "a.distcp").write_bytes(bytes(data))
    [problem] = integrity.problems(tmp_path, expected)
    assert f"{tmp_path / 'a.distcp'} is corrupt" in problem


def test_a_full_disk_is_named_as_such(tmp_path):
    storage.write_atomic(tmp_path / storage.TRACKER_FILENAME, "7\n")
    failure = RuntimeError("Worker failure")
    failure.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    text = storage.describe_write_failure(failure, tmp_path, 9)
    assert f"to {tmp_path}: the disk is full" in text and "still names iteration 7" in text
    other = storage.describe_write_failure(PermissionError("denied"), tmp_path, 9)
    assert "disk is full" not in other and "PermissionError: denied" in other


def test_checkpoint_flags():
    cfg, _ = config_from_args(["--async-save", "--no-ckpt-verify", "--ckpt-keep-last", "3"])
    assert cfg.checkpoint.async_save and cfg.checkpoint.no_ckpt_verify
    assert cfg.checkpoint.ckpt_keep_last == 3
    with pytest.raises(ConfigError, match="ckpt_keep_last must be >= 1, got 0"):
        config_from_args(["--ckpt-keep-last", "0"])


def test_files_are_flushed_while_they_are_hashed(tmp_path, monkeypatch):
    # the writer leaves fsync to _flush_while_hashing: every file must still be flushed, its
    # checksum left for the publishing rank, and a failed flush reported (a save not durable)
    import json
    import os

    from megatron_mimo.checkpoint import background

    paths = []
    for index in range(2):
        path = tmp_path / f"__0_{index}.distcp"
        path.write_bytes(bytes(range(256)) * (index + 1))
        paths.append(str(path))
    flushed = []
    monkeypatch.setattr(os, "fsync", lambda descriptor: flushed.append(descriptor))
    seconds = collections.defaultdict(float)
    assert background._flush_while_hashing(str(tmp_path), 0, paths, seconds) is None
    assert len(flushed) == 2
    side = json.loads((tmp_path / f"{integrity.SIDECAR_PREFIX}0.json").read_text())
    assert side == integrity.checksums(tmp_path, [os.path.basename(p) for p in paths])
    assert {"writer.hash", "writer.flush", "writer.hash_exposed"} <= set(seconds)

    def broken(descriptor):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    failure = background._flush_while_hashing(str(tmp_path), 0, paths, seconds)
    assert isinstance(failure, OSError) and failure.errno == errno.EIO


def test_the_writer_thread_takes_its_rank_device(monkeypatch):
    # a new thread starts on device 0 whatever its rank's: megatron's finalisation allocates on
    # the current device, so the writer thread must take the device of the rank that started it
    import threading

    import torch

    from megatron_mimo.checkpoint import background

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 3)
    taken = []
    monkeypatch.setattr(torch.accelerator, "set_device_index",
                        lambda index: taken.append((index, threading.current_thread().name)))

    def plan():
        raise RuntimeError("no plan")

    saves = background.BackgroundSaves(group=None)
    saves.start(plan, lambda request, error: f"failed: {error}", iteration=1)
    saves.done.wait(timeout=30)
    saves.close()
    assert taken == [(3, background.WRITER_NAME)]
    assert saves.outcome == "failed: no plan"
