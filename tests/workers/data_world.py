"""Worlds on real data (a prepared digits dataset, ``args["data"]``).

Modes (args["mode"]):
  "saved"    4 ranks, images DP2 -> language TP2 DP1; for each run of :data:`RUNS` (captions
             with --num-workers 0 and 2; instruction data, ``args["vqa"]``, with the vision tower
             frozen as in LLaVA's stage 2; images with tones, ``args["av"]``, on three branches:
             images rank 0, audio rank 1, language TP2): 2N iterations straight, then N
             iterations + save (the sample keys of every micro-batch on every rank are recorded)
  "resumed"  fresh processes: each checkpoint loaded and trained N more iterations; then
             images DP1 -> language DP3: that checkpoint's loader state refused (another
             layout), and sample agreement
Each mode returns its dataclass below; the iteration records inside stay the production record
(cut to the exact keys by :func:`tests.workers.ckpt_world.exact`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_mimo.config import MimoConfig
from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.presets import tiny_cpu
from tests.workers.ckpt_world import exact
from tests.workers.common import forbid_parallel_state_groups, worker_main

N = 3
RUNS: dict[str, dict[str, Any]] = {
    "w0": {"data.num_workers": 0},
    "w2": {"data.num_workers": 2},
    "vqa": {"data.num_workers": 0, "training.freeze_vit": True},
    "av": {"data.num_workers": 0, "images_parallel.dp": 1, "audio_parallel.offset": 1},
}
"""Runs of modes "saved" and "resumed" by name; "vqa" reads ``args["vqa"]``, "av"
``args["av"]``, the others ``args["data"]``."""
FAN_OUT = {"images_parallel.dp": 1, "language_parallel.tp": 1, "language_parallel.dp": 3,
           "language_parallel.offset": 1, "training.micro_batch_size": 4,
           "training.global_batch_size": 24}
GLOBAL_BATCH = 16


@dataclass
class Place:
    """This rank's branch and its DP / TP rank in it."""

    branch: str
    dp: int
    tp: int


@dataclass
class Step:
    """One iteration: exact() of its record and this rank's sample keys per micro-batch."""

    record: dict
    keys: list[list[str]]


@dataclass
class SavedRun:
    """Mode "saved", one run of :data:`RUNS`: the straight run and the run until its save."""

    name: str
    place: Place
    straight: list[Step]
    until_save: list[Step]


@dataclass
class ResumedRun:
    """Mode "resumed", one run of :data:`RUNS`: the checkpoint's iteration and N more steps."""

    name: str
    iteration: int
    steps: list[Step]


@dataclass
class FanOut:
    """Images DP1 -> language DP3, trained from scratch."""

    place: Place
    steps: list[Step]


@dataclass
class Resumed:
    """Mode "resumed" on one rank."""

    runs: list[ResumedRun]
    other_layout_error: str | None
    """The load of a loader state saved under another layout (None: it loaded)."""
    fan_out: FanOut


def make_cfg(data: str, overrides: dict[str, Any]) -> MimoConfig:
    base = {"data.data_path": data, "images.hidden_dropout": 0.1,
            "language.hidden_dropout": 0.1, "scheduler.lr_warmup_iters": N + 1,
            "training.train_iters": 2 * N, "training.global_batch_size": GLOBAL_BATCH,
            "training.micro_batch_size": 8, "checkpoint.ckpt_timeout_s": 60}
    return apply_overrides(tiny_cpu(), {**base, **overrides})


def place(trainer) -> Place:
    topology = trainer.job.topology
    return Place(branch=trainer.branch, dp=topology.dp_rank(), tp=topology.tp_rank())


def steps(trainer, count: int) -> list[Step]:
    """``count`` iterations."""
    out = []
    for _ in range(count):
        record = exact(trainer.step())
        out.append(Step(record=record, keys=trainer.job.data.last_keys))
    return out


def run_cfg(args: dict, name: str, overrides: dict[str, Any] | None = None) -> MimoConfig:
    """The configuration of run ``name`` of :data:`RUNS`."""
    data = args[name] if name in ("vqa", "av") else args["data"]
    return make_cfg(data, {**RUNS[name], **(overrides or {})})


def mode_saved(args: dict) -> list[SavedRun]:
    """One :class:`SavedRun` per entry of :data:`RUNS`, in that order."""
    from megatron_mimo.training.trainer import Trainer

    out = []
    for name in RUNS:
        with Trainer(run_cfg(args, name)) as straight:
            where, straight_steps = place(straight), steps(straight, 2 * N)
        with Trainer(run_cfg(args, name, {"checkpoint.save": f"{args['root']}/{name}"})) as saved:
            until_save = steps(saved, N)
            saved.save()
        out.append(SavedRun(name=name, place=where, straight=straight_steps,
                            until_save=until_save))
    return out


def _error_of(action) -> str | None:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return None


def mode_resumed(args: dict) -> Resumed:
    from megatron_mimo.training.trainer import Trainer

    runs = []
    for name in RUNS:
        with Trainer(run_cfg(args, name, {"checkpoint.load": f"{args['root']}/{name}"})) as run:
            run.load()
            runs.append(ResumedRun(name=name, iteration=run.state.iteration,
                                   steps=steps(run, N)))
    other_layout = {**FAN_OUT, "checkpoint.load": f"{args['root']}/w0",
                    "checkpoint.no_load_optim": True}
    with Trainer(make_cfg(args["data"], other_layout)) as probe:
        other_layout_error = _error_of(probe.load)
    with Trainer(make_cfg(args["data"], FAN_OUT)) as fan_out:
        fanned = FanOut(place=place(fan_out), steps=steps(fan_out, N))
    return Resumed(runs=runs, other_layout_error=other_layout_error, fan_out=fanned)


MODES = {"saved": mode_saved, "resumed": mode_resumed}


def body(args: dict) -> Any:
    forbid_parallel_state_groups()
    return MODES[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
