"""Repeated async saves (a mode of :mod:`tests.workers.ckpt_world`), the training going on while
each is written: a job that saves in the background every few steps must hold, after each save
is published, what it held after the first (which allocates the staging buffers): no state copy,
save plan, request or writer kept per save. And what is written is the state at the save, not
what the steps taken while the writer ran made of it: the writer is held back
(:data:`SLOW_WRITER`) so that those steps surely happen."""

from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass

import psutil
import torch

from megatron_mimo import failpoints
from megatron_mimo.checkpoint.background import WRITER_NAME
from tests.workers.ckpt_layouts import TWO_RANKS, make_cfg

SAVES = 5
SLOW_WRITER = "checkpoint.stage_start=sleep(0.3);checkpoint.writer_start=sleep(0.3)"
"""Every writer waits before it copies the tensors and again before it writes (a step here is
~0.1 s): an update before the copy, or a write from the live tensors, would be saved."""


@dataclass
class Held:
    """What the process holds after each published save (one entry per save)."""

    tensor_bytes: list[int]
    """Bytes of every distinct tensor storage reachable from Python."""
    objects: list[int]
    """Objects the garbage collector tracks."""
    rss: list[int]
    pending: list[int]
    """1 while a save is not finalised."""
    helpers: list[int]
    """Child processes and writer threads alive (one thread serves every save)."""
    steps_during_write: list[int]
    loads_as_saved: bool = False
    """The last checkpoint's main parameters, loaded by a new run, equal them at the save."""


def tensor_bytes() -> int:
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storage.nbytes(), storages.get(storage.data_ptr(), 0))
    return sum(storages.values())


def mode_repeated_async_saves(args: dict) -> Held:
    """Train, save in the background, train while the writer runs, publish; SAVES times. Then
    load the last checkpoint in a new run."""
    os.environ[failpoints.ENV] = SLOW_WRITER
    failpoints.reset()
    try:
        held, at_save = _saves(args["root"])
        held.loads_as_saved = _load_equals(args["root"], at_save)
    finally:
        del os.environ[failpoints.ENV]
        failpoints.reset()
    return held


def _saves(root: str) -> tuple[Held, list[torch.Tensor]]:
    from tests.workers.ckpt_world import Run

    run = Run(make_cfg(TWO_RANKS, {"checkpoint.save": root, "checkpoint.async_save": True,
                                   "checkpoint.ckpt_keep_last": 1, "training.train_iters": 100}))
    held = Held([], [], [], [], [], [])
    for _ in range(SAVES):
        run.step()
        run.save()
        at_save, steps = run.main_params(), 0
        while run.manager.background.pending:
            run.step()
            run.manager.poll()
            steps += 1
        gc.collect()
        held.steps_during_write.append(steps)
        held.tensor_bytes.append(tensor_bytes())
        held.objects.append(len(gc.get_objects()))
        held.rss.append(psutil.Process().memory_info().rss)
        held.pending.append(int(run.manager.background.pending))
        held.helpers.append(len(psutil.Process().children(recursive=True)) + sum(
            thread.name == WRITER_NAME for thread in threading.enumerate()))
    run.close()
    return held, at_save


def _load_equals(root: str, at_save: list[torch.Tensor]) -> bool:
    from tests.workers.ckpt_world import Run, same_tensors

    run = Run(make_cfg(TWO_RANKS, {"checkpoint.load": root}))
    run.load()
    loaded = run.main_params()
    run.close()
    return same_tensors(at_save, loaded)
