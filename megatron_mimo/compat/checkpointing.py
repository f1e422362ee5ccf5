"""Workarounds around megatron-core's torch_dist save and load (any device): what its
``dist_checkpointing`` API gives no hook for. Each is proven necessary by
``tests/distributed/test_workarounds_needed.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from megatron_mimo.compat.registry import workaround


@workaround(trigger="an async torch_dist save finalised outside the thread that planned it",
            remove_when="TorchDistSaveShardedStrategy.async_save takes a process group")
def finalised_on(group: Any, planned: tuple) -> tuple:
    """``planned`` (megatron's ``save_state_dict_async_plan`` result: writer, metadata,
    ``_DistWrapper``) with the wrapper's collectives moved to ``group``.

    ``TorchDistSaveShardedStrategy.async_save`` plans with ``process_group=None``, so its
    finalisation gathers the write results and broadcasts the outcome over the *default* group.
    A background thread that finalises there would interleave its collectives with the training
    loop's on the same group (a mismatch or a hang); on a group of its own it cannot."""
    from torch.distributed.checkpoint.utils import _DistWrapper

    storage_writer, metadata, wrapper = planned
    return storage_writer, metadata, _DistWrapper(group, True, wrapper.coordinator_rank)


def save_strategy_finalised_on(group: Any):
    """megatron-core's torch_dist save strategy (plans cached across saves with the same
    structure) whose async finalisation runs its collectives on ``group`` (see
    :func:`finalised_on`)."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class GroupFinalised(TorchDistSaveShardedStrategy):
        def _get_save_and_finalize_callbacks(self, writer, planned, async_strategy):
            return super()._get_save_and_finalize_callbacks(writer, finalised_on(group, planned),
                                                            async_strategy)

    return GroupFinalised(cached_metadata=True)


@workaround(trigger="a torch_dist load through a storage reader of our own",
            remove_when="TorchDistLoadShardedStrategy.load accepts a storage reader")
@contextlib.contextmanager
def read_by(reader_for: Callable[[Any], Any]) -> Iterator[Any]:
    """A load strategy whose loads read each checkpoint directory through ``reader_for(path)``.

    megatron-core's loader builds its DCP ``FileSystemReader`` itself, with no parameter to
    pass another. Its reader parses ``.metadata`` again (~0.2 s per rank at production size,
    after the checks before a load have parsed it) and reads every tensor through a temporary
    copy. The module function that builds the reader is replaced while the strategy is used
    (loads run in the training thread; the save writer never builds readers)."""
    from megatron.core.dist_checkpointing.strategies import torch as strategies

    original = strategies._get_filesystem_reader

    def ours(checkpoint_dir: Any, cache_metadata: bool = False, async_strategy: str = "mcore"):
        return reader_for(checkpoint_dir)

    strategies._get_filesystem_reader = ours
    try:
        yield strategies.TorchDistLoadShardedStrategy()
    finally:
        strategies._get_filesystem_reader = original


@workaround(trigger="checksums of a torch_dist save's files, hashed while the disk flushes them",
            remove_when="FileSystemWriterAsync lets its caller run code between write and fsync")
def write_unflushed(write: Any, write_buckets: list) -> dict | Exception | None:
    """Run megatron's write function ``write`` on ``write_buckets`` without its ``fsync``; return
    what it would have put in its results queue (results per bucket, or the failure), or None
    when ``write`` is not megatron's thread writer (the caller then runs it as it is).

    ``write_preloaded_data_multithread`` fsyncs each file as its last step, so hashing the files
    afterwards adds the whole hash to the save. Flushed by the caller instead, the flush (which
    waits on the disk) and the hash (which uses a core) run together. The buckets are written one
    after the other (megatron writes one per thread; a save here has one bucket per rank)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    if getattr(write, "func", None) is not FileSystemWriterAsync.write_preloaded_data_multithread:
        return None
    transform_list, use_msc = write.args
    if use_msc:
        return None
    results: dict = {}
    for index, bucket in enumerate(write_buckets):
        _, written = FileSystemWriterAsync.write_preloaded_data(
            transform_list, index, bucket, None, None, use_fsync=False)
        if isinstance(written, Exception):
            return written
        results[index] = written
    return results
