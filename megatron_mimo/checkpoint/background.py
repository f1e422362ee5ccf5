"""Background (async) checkpoint writes: a staged copy, taken and written by a thread of the rank.

``dist_checkpointing.save(..., async_sharded_save=True)`` plans the save with every rank and
returns an ``AsyncRequest``: megatron-core's write function (its multithreaded file writer), this
rank's write buckets (files, items, tensors) and the finalisation steps (gather the write results,
``.metadata``, then ours: common state, checksums, manifest, publish). Everything but tensors
(RNG states, loader and scheduler state) is serialised to bytes by the plan. What this module adds:

- the snapshot is a copy of this rank's tensors into staging buffers kept from one save to the
  next (allocated by the first save; pinned host memory for accelerator tensors). The writer
  thread takes it while the loop runs the next forward and backward, which read the saved
  tensors but do not change them; the loop waits for the copy (:meth:`BackgroundSaves.hold`)
  only before its next update. A forked writer would make the fork the snapshot instead, but
  then every page the training writes while the writer lives is copied on a fault: measured
  here at ~1.3 s per GB of state, paid by the steps that follow the save, ~5x the copy;
- the write runs in that thread, at a lower CPU priority on Linux (ranks and writers share the
  cores), and hashes the files it wrote; it dies with its rank (no helper process, no pickling,
  no queue across processes);
- every rank's writer must be done before anything is published: the world agrees on that with
  an all-reduce over the checkpoint group started by one poll and read by the next (one step
  later, so the loop never waits for the slowest rank to reach it), then runs the finalisation
  steps on every rank together.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_mimo import failpoints
from megatron_mimo.checkpoint import integrity

logger = logging.getLogger(__name__)

WRITER_NICENESS = 10
"""How much lower the writer thread's CPU priority is than its rank's. The training ranks and the
writers share the cores; a rank still starting its own save, or stepping while the shards are
written, must not wait for a writer (on 2 cores with 4 ranks, equal priority let the writers
double one rank's share of the stall)."""
WRITER_NAME = "checkpoint-writer"


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux schedules threads one by one; elsewhere no-op)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        except OSError as error:  # e.g. a seccomp profile without setpriority
            logger.debug("could not lower the writer's priority: %s", error)


def write_and_hash(write: Callable[..., None], directory: str, iteration: int, rank: int,
                   write_buckets: list, results_queue: Any, *args: Any, **kwargs: Any) -> None:
    """megatron-core's write function, then the checksums of the files it wrote (page cache)."""
    failpoints.hit("checkpoint.writer_start", rank=rank, iteration=iteration)
    write(rank, write_buckets, results_queue, *args, **kwargs)
    try:
        integrity.write_sidecar(Path(directory), rank, [bucket[0] for bucket in write_buckets])
    except OSError as error:  # a failed write (reported at finalisation), or the publishing
        logger.debug("could not hash the files written to %s: %s", directory, error)  # rank hashes


def with_checksums(request: Any, directory: Path, iteration: int) -> Any:
    """``request`` whose write also hashes the files (nothing to do on a rank with no data)."""
    if request.async_fn is None:
        return request
    return request._replace(async_fn=partial(write_and_hash, request.async_fn, str(directory),
                                             iteration))


class Staging:
    """Buffers that hold this rank's copy of the state being written, reused by every save with
    the same items (a structure change drops the buffers no longer written)."""

    def __init__(self) -> None:
        self.buffers: dict[Any, torch.Tensor] = {}

    def stage(self, write_buckets: list) -> list:
        """``write_buckets`` with every tensor replaced by its copy in a staging buffer."""
        used, staged, on_device = {}, [], False
        for path, name, (bytes_data, tensor_data) in write_buckets:
            copies = []
            for item, tensor in tensor_data:
                buffer = self._buffer(item.index, tensor)
                buffer.copy_(tensor.detach(), non_blocking=True)
                on_device |= tensor.device.type != "cpu"
                used[item.index] = buffer
                copies.append((item, buffer))
            staged.append((path, name, (bytes_data, copies)))
        if on_device:  # the copies above are asynchronous device-to-host transfers
            torch.accelerator.synchronize()
        self.buffers = used
        return staged

    def _buffer(self, key: Any, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype,
                                 pin_memory=tensor.device.type != "cpu")
        return buffer


class BackgroundSaves:
    """The pending async save of a rank: its request, its writer thread, and the world-wide
    agreement that every writer finished (over ``group``)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.staging = Staging()
        self.request: Any = None
        self.writer: threading.Thread | None = None
        self.staged = threading.Event()
        self.staged.set()
        self.agreement: tuple[torch.Tensor, Any] | None = None
        """The all-reduce of "writers still running" a poll started, read by the next."""

    @property
    def pending(self) -> bool:
        """A save was started and is not finalised yet (same answer on every rank)."""
        return self.request is not None

    def start(self, request: Any, iteration: int) -> None:
        """Start the thread that copies this rank's tensors into the staging buffers, then
        writes them; the tensors must not change before :meth:`hold` returns."""
        self.request = request
        if request.async_fn is None:  # nothing to write on this rank
            return
        self.staged.clear()
        self.writer = threading.Thread(target=self._write, args=(iteration,), name=WRITER_NAME,
                                       daemon=True)  # a failed job exits without waiting for it
        self.writer.start()

    def hold(self) -> None:
        """Block until the pending save's copy of this rank's tensors is taken (call before
        anything changes a saved tensor: the optimizer's update)."""
        self.staged.wait()

    def _write(self, iteration: int) -> None:
        """The thread: megatron-core's writer reports its own failures through the results
        queue; any other failure (the copy included) goes there too, so finalisation names it
        on every rank."""
        _lower_priority()
        rank, buckets, results, *rest = self.request.async_fn_args
        try:
            try:
                failpoints.hit("checkpoint.stage_start", rank=rank, iteration=iteration)
                staged = self.staging.stage(buckets)
            finally:
                self.staged.set()
            self.request.async_fn(rank, staged, results, *rest, **self.request.async_fn_kwargs)
        except Exception as error:  # noqa: BLE001 - reported at finalisation
            results.put(error)

    def poll(self) -> bool:
        """Finalise the pending save if the agreement started by the previous poll says every
        writer was done; else start a new one. Never waits for another rank: the previous
        all-reduce was started by every rank a step ago."""
        if self.agreement is not None:
            running, work = self.agreement
            work.wait()
            self.agreement = None
            if not running.item():
                self._finalise()
                return True
        running = torch.tensor([int(self.writer is not None and self.writer.is_alive())])
        self.agreement = (running, dist.all_reduce(running, group=self.group, async_op=True))
        return False

    def wait(self) -> None:
        """Block until the pending save is written everywhere, then finalise it."""
        if self.agreement is not None:  # every rank started it: finish it in the same order
            self.agreement[1].wait()
            self.agreement = None
        if self.writer is not None:
            self.writer.join()
        dist.barrier(group=self.group)
        self._finalise()

    def _finalise(self) -> None:
        request, self.request, self.writer = self.request, None, None
        for finalise in request.finalize_fns:
            finalise()

    def abort(self) -> None:
        """Forget the pending save (the job failed): nothing is published. A writer still
        running is a daemon thread: it ends with the process, inside the staging directory."""
        self.request, self.writer, self.agreement = None, None, None
        self.staged.set()
