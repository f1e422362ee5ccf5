"""Background (async) checkpoint writes through megatron-core's own machinery.

``dist_checkpointing.save(..., async_sharded_save=True)`` plans the save with every rank and
returns an ``AsyncRequest``: the write function plus the finalisation steps (gather the write
results, ``.metadata``, ``metadata.json``, and ours: checksums, manifest, publish). megatron-core's
``AsyncCallsQueue`` runs the write in a forked process (its NVRx strategy on a GPU when
nvidia-resiliency-ext is installed) and finalises only when an all-reduce says *every* rank's
writer is done. What is added here: the writer hashes the files it wrote, dies with its rank
(no helper outlives the job), and a pending save can be aborted when the job fails.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.torch import HAVE_NVRX, get_async_strategy

from megatron_mimo import failpoints
from megatron_mimo.checkpoint import integrity

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
WRITER_NICENESS = 10
"""How much lower the writer's CPU priority is than its rank's. The training ranks and the
writers share the cores; a rank still starting its own save, or stepping while the shards are
written, must not wait for a writer (on 2 cores with 4 ranks, equal priority let the writers
double one rank's share of the stall)."""


def async_strategy() -> str:
    """megatron-core's async implementation for this job: NVRx on NCCL when installed (what
    megatron-core recommends on GPUs), else its own (forked writer; the one that runs on CPU)."""
    return "nvrx" if HAVE_NVRX and "nccl" in str(dist.get_backend()) else "mcore"


def _die_with_parent(parent_pid: int) -> None:
    """In a helper process: ask the kernel to kill us when the training rank dies (Linux), so a
    killed job leaves no writer behind, still writing into its staging directory."""
    if os.getpid() == parent_pid or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the rank died before the prctl took effect
        os._exit(1)


def write_and_hash(write: Callable[..., None], directory: str, iteration: int, parent_pid: int,
                   rank: int, write_buckets: list, results_queue: Any, *args: Any,
                   **kwargs: Any) -> None:
    """megatron-core's write function, then the checksums of the files it wrote (page cache)."""
    _die_with_parent(parent_pid)
    os.nice(WRITER_NICENESS)
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
                                             iteration, os.getpid()))


class BackgroundSaves:
    """megatron-core's queue of async calls, polled with a world-wide agreement."""

    def __init__(self) -> None:
        self.strategy = async_strategy()
        self.queue = get_async_strategy(self.strategy)[1]["AsyncCallsQueue"]()

    @property
    def pending(self) -> bool:
        """A save was started and is not finalised yet (same answer on every rank)."""
        return self.queue.get_num_unfinalized_calls() > 0

    def start(self, request: Any) -> None:
        """Start writing in the background (every rank, together)."""
        self.queue.schedule_async_request(request)

    def poll(self) -> bool:
        """Finalise the pending save if every rank's writer is done; one all-reduce."""
        return bool(self.queue.maybe_finalize_async_calls(blocking=False))

    def wait(self) -> None:
        """Block until the pending save is written everywhere, then finalise it."""
        self.queue.maybe_finalize_async_calls(blocking=True)

    def abort(self) -> None:
        """Kill the writers of a pending save (the job failed): nothing is published."""
        for call in self.queue.async_calls:
            call.async_caller.close(abort=True)
        self.queue.async_calls.clear()
