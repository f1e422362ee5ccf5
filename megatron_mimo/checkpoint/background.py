"""Background (async) checkpoint writes: a staged copy, taken and written by a thread of the rank.

A save first agrees with every rank (the loop), then hands megatron-core's save to the rank's
writer thread: the plan (``async_save``: its write function, this rank's write buckets and the
finalisation; everything but tensors, RNG, loader and scheduler state, is serialised to bytes
by the plan), the copy, the write, the finalisation. What this module adds:

- the snapshot is a copy of this rank's tensors into staging buffers kept from one save to the
  next (allocated by the first save; pinned host memory for accelerator tensors). The writer
  thread takes it while the loop runs the next forward and backward, which read the saved
  tensors but do not change them; the loop waits for the copy (:meth:`BackgroundSaves.hold`)
  only before its next update. A forked writer would make the fork the snapshot instead, but
  then every page the training writes while the writer lives is copied on a fault: measured
  here at ~1.3 s per GB of state, paid by the steps that follow the save, ~5x the copy;
- the thread also plans, once megatron's plan is cached (the same structure saved before: no
  collective, only tensor metadata read), and finalises: gathering the write results, rank 0's
  ``.metadata``, checksums, manifest and publish run on a process group of the writers' own, so
  none of it runs in the loop and none of its collectives meets one of the loop's;
- the thread runs at a lower CPU priority on Linux (ranks and writers share the cores), hashes
  the files it wrote, and dies with its rank (no helper process, no pickling, no queue across
  processes);
- the loop learns that every rank's writer is done from an all-reduce over the checkpoint
  group started by one poll and read by the next (one step later, so the loop never waits for
  the slowest rank to reach it), then raises the save's error, which the writers agreed on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_mimo import failpoints
from megatron_mimo.checkpoint import integrity, storage
from megatron_mimo.compat.checkpointing import write_unflushed

logger = logging.getLogger(__name__)

WRITER_NAME = "checkpoint-writer"


def write_and_hash(write: Callable[..., None], directory: str, iteration: int,
                   seconds: dict[str, float], rank: int, write_buckets: list, results_queue: Any,
                   *args: Any, **kwargs: Any) -> None:
    """megatron-core's write function, then the checksums of the files it wrote (page cache),
    taken while the disk flushes them (a thread fsyncs; hashing and flushing overlap)."""
    failpoints.hit("checkpoint.writer_start", rank=rank, iteration=iteration)
    paths = [bucket[0] for bucket in write_buckets]
    results = write_unflushed(write, write_buckets)
    if results is None:  # a writer that flushes itself: hash afterwards
        write(rank, write_buckets, results_queue, *args, **kwargs)
        start = time.perf_counter()
        _hash(directory, rank, paths, seconds)
        seconds["writer.hash_exposed"] += time.perf_counter() - start
        return
    if not isinstance(results, Exception):
        results = _flush_while_hashing(directory, rank, paths, seconds) or results
    results_queue.put(results)  # what megatron's finalisation reads: results or the failure


def _flush_while_hashing(directory: str, rank: int, paths: list[str],
                         seconds: dict[str, float]) -> OSError | None:
    """fsync ``paths`` in a thread while this one hashes them; the flush's failure, if any.
    'writer.hash_exposed' is the part of the hash that outlasted the flush: what the checksums
    add to the write."""
    failures: list[OSError] = []
    flushed_at: list[float] = []

    def flush() -> None:
        try:
            for path in paths:
                storage.fsync_path(path)
        except OSError as error:
            failures.append(error)
        flushed_at.append(time.perf_counter())

    start = time.perf_counter()
    flusher = threading.Thread(target=flush, name="checkpoint-flush", daemon=True)
    flusher.start()
    _hash(directory, rank, paths, seconds)
    hashed_at = time.perf_counter()
    flusher.join()
    seconds["writer.flush"] += flushed_at[0] - start
    seconds["writer.hash_exposed"] += max(0.0, hashed_at - flushed_at[0])
    return failures[0] if failures else None


def _hash(directory: str, rank: int, paths: list[str], seconds: dict[str, float]) -> None:
    start = time.perf_counter()
    try:
        integrity.write_sidecar(Path(directory), rank, paths)
    except OSError as error:  # a failed write (reported at finalisation), or the publishing
        logger.debug("could not hash the files written to %s: %s", directory, error)  # rank hashes
    seconds["writer.hash"] += time.perf_counter() - start


def with_checksums(request: Any, directory: Path, iteration: int,
                   seconds: dict[str, float]) -> Any:
    """``request`` whose write also hashes the files (nothing to do on a rank with no data);
    the writer's hash and flush times go to ``seconds``."""
    if request.async_fn is None:
        return request
    return request._replace(async_fn=partial(write_and_hash, request.async_fn, str(directory),
                                             iteration, seconds))


def rank_device() -> int | None:
    """This thread's accelerator device index (None without one): the writer thread takes its
    rank's device, since megatron's finalisation allocates on the current device."""
    return torch.accelerator.current_device_index() if torch.accelerator.is_available() else None


class Staging:
    """Buffers that hold this rank's copy of the state being written, reused by every save with
    the same items (a structure change drops the buffers no longer written)."""

    def __init__(self) -> None:
        self.buffers: dict[Any, torch.Tensor] = {}

    def stage(self, write_buckets: list) -> list:
        """``write_buckets`` with every tensor replaced by its copy in a staging buffer."""
        used, staged, devices = {}, [], set()
        for path, name, (bytes_data, tensor_data) in write_buckets:
            copies = []
            for item, tensor in tensor_data:
                buffer = self._buffer(item.index, tensor)
                buffer.copy_(tensor.detach(), non_blocking=True)
                if tensor.device.type != "cpu":
                    devices.add(tensor.device)
                used[item.index] = buffer
                copies.append((item, buffer))
            staged.append((path, name, (bytes_data, copies)))
        for device in devices:  # the copies above are asynchronous device-to-host transfers
            torch.accelerator.synchronize(device)
        self.buffers = used
        return staged

    def _buffer(self, key: Any, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype,
                                 pin_memory=tensor.device.type != "cpu")
        return buffer


class BackgroundSaves:
    """The pending save of a rank, run by the rank's one writer thread (plan if given, copy,
    write, finalise), and the agreement that every rank's writer is done (over ``group``, the
    loop's checkpoint group; the writers' own collectives run on the finalisation group the
    ``finish`` step uses).

    The thread lives from the first save to :meth:`close`: a thread per save would leave each
    save's allocations in a new malloc arena (measured: RSS +9 MB per save, flat with one)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.staging = Staging()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.running = False
        self.outcome: str | None = None
        """The finished save's error (the same on every rank), None when it was published."""
        self.staged, self.done = threading.Event(), threading.Event()
        self.staged.set()
        self.done.set()
        self.agreement: tuple[torch.Tensor, Any] | None = None
        """The all-reduce of "writers still running" a poll started, read by the next."""

    @property
    def pending(self) -> bool:
        """A save was started and is not finished yet (same answer on every rank)."""
        return self.running

    def start(self, plan: Callable[[], Any], finish: Callable[[Any, BaseException | None], str | None],
              iteration: int) -> None:
        """Have the writer thread plan (``plan()`` returns megatron's request), copy this rank's
        tensors into the staging buffers, write them, then run ``finish(request, error)``, which
        agrees with every rank on the outcome and publishes. The saved tensors must not change
        before :meth:`hold` returns."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, args=(rank_device(),),
                                           name=WRITER_NAME, daemon=True)  # dies with the job
            self.thread.start()
        self.staged.clear()
        self.done.clear()
        self.outcome, self.running = None, True
        self.jobs.put((plan, finish, iteration))

    def hold(self) -> None:
        """Block until the pending save's copy of this rank's tensors is taken (call before
        anything changes a saved tensor: the optimizer's update)."""
        self.staged.wait()

    def _serve(self, device: int | None) -> None:
        if device is not None:  # a new thread starts on device 0, whatever its rank's
            torch.accelerator.set_device_index(device)
        integrity.lower_priority()
        while (job := self.jobs.get()) is not None:
            self._work(*job)
            job = None  # nothing of a finished save stays referenced until the next one
            self.done.set()

    def _work(self, plan: Callable[[], Any], finish: Callable[..., str | None],
              iteration: int) -> None:
        """One save. Every failure of this rank goes to ``finish``, which every rank reaches,
        so the world agrees on it; nothing escapes the thread."""
        request, error = None, None
        try:
            try:
                request = plan()
                rank, buckets, results, *rest = request.async_fn_args or (None, [], None)
                failpoints.hit("checkpoint.stage_start", rank=dist.get_rank(), iteration=iteration)
                staged = self.staging.stage(buckets)
            finally:
                self.staged.set()
            if request.async_fn is not None:
                request.async_fn(rank, staged, results, *rest, **request.async_fn_kwargs)
        except Exception as failure:  # noqa: BLE001 - agreed on and reported by finish
            error = failure
        try:
            self.outcome = finish(request, error)
        except Exception as failure:  # noqa: BLE001 - a bug: still report it, do not hang
            self.outcome = f"checkpoint save of iteration {iteration} failed: {failure!r}"

    def poll(self) -> bool:
        """True once every rank's writer finished (by the agreement the previous poll started;
        never waits for another rank: every rank started that all-reduce a step ago)."""
        if self.agreement is not None:
            running, work = self.agreement
            work.wait()
            self.agreement = None
            if not running.item():
                return self._finished()
        running = torch.tensor([int(not self.done.is_set())])
        self.agreement = (running, dist.all_reduce(running, group=self.group, async_op=True))
        return False

    def wait(self) -> None:
        """Block until the pending save is written and finished everywhere."""
        if self.agreement is not None:  # every rank started it: finish it in the same order
            self.agreement[1].wait()
            self.agreement = None
        self._finished()

    def _finished(self) -> bool:
        self.done.wait()
        self.running = False
        return True

    def close(self) -> None:
        """End the writer thread (no save pending)."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None

    def abort(self) -> None:
        """Forget the pending save (the job failed): nothing is published. A writer still
        busy is a daemon thread: it ends with the process, inside the staging directory."""
        self.running, self.agreement = False, None
        self.staged.set()
