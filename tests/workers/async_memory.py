"""Memory across repeated async saves (a mode of :mod:`tests.workers.ckpt_world`): a job that
saves in the background every few steps must hold, after each save is published, what it held
after the first: no state copy, save plan, request or writer kept per save."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import psutil
import torch

from tests.workers.ckpt_layouts import TWO_RANKS, make_cfg

SAVES = 5


@dataclass
class Held:
    """What the process holds after each published save (one entry per save)."""

    tensor_bytes: list[int]
    """Bytes of every distinct tensor storage reachable from Python."""
    objects: list[int]
    """Objects the garbage collector tracks."""
    rss: list[int]
    pending: list[int]
    """Calls left in megatron-core's async queue."""
    helpers: list[int]
    """Child processes alive (the writers must be joined)."""


def tensor_bytes() -> int:
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storage.nbytes(), storages.get(storage.data_ptr(), 0))
    return sum(storages.values())


def mode_repeated_async_saves(args: dict) -> Held:
    """Train, save in the background, train while the writer runs, publish; SAVES times."""
    from tests.workers.ckpt_world import Run

    run = Run(make_cfg(TWO_RANKS, {"checkpoint.save": args["root"], "checkpoint.async_save": True,
                                   "checkpoint.ckpt_keep_last": 1, "training.train_iters": 100}))
    held = Held([], [], [], [], [])
    for _ in range(SAVES):
        run.step()
        run.save()
        while run.manager.background.pending:
            run.step()
            run.manager.poll()
        gc.collect()
        held.tensor_bytes.append(tensor_bytes())
        held.objects.append(len(gc.get_objects()))
        held.rss.append(psutil.Process().memory_info().rss)
        held.pending.append(run.manager.background.queue.get_num_unfinalized_calls())
        held.helpers.append(len(psutil.Process().children(recursive=True)))
    run.close()
    return held
