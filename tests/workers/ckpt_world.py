"""Checkpoint worlds: straight vs saved-and-resumed runs and the load flags, plus the ``Run``
probes they share with :mod:`tests.workers.ckpt_failure_world`.

Modes (args["mode"]), each returning its dataclass below (the iteration records inside stay the
production record, ``Trainer.step()``, cut to :data:`EXACT_KEYS` by :func:`exact`):
  "straight_and_saved"  2N iterations straight; then N iterations, save, stop (same processes)
  "resumed"             fresh processes: load that checkpoint, check it, train N more
  "flags"               load one checkpoint several times with --no-load-* / --finetune
``{"runs": [...]}`` runs several modes in turn in the same processes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist

from megatron_mimo.config import IMAGES, MimoConfig
from tests.workers.async_memory import mode_repeated_async_saves
from tests.workers.ckpt_layouts import TWO_RANKS, N, make_cfg
from tests.workers.common import forbid_parallel_state_groups, worker_main

EXACT_KEYS = ("iteration", "consumed_samples", "loss", "grad_norm", "lr", "num_tokens", "skipped",
              "skipped_iterations", "consumed_tokens", "floating_point_operations", "loss_scale")
"""Keys of the production iteration record that a resume must reproduce bit for bit."""


@dataclass
class Position:
    """Where a run continues from: one draw of every RNG stream and the next sample indices."""

    rng: list[float]
    indices: list[int]


@dataclass
class Saved:
    """Mode "straight_and_saved" on one rank."""

    branch: str
    straight: list[dict]
    """exact() of the 2N iterations of the run that never stops."""
    until_save: list[dict]
    """exact() of the N iterations of the run that saves at N and stops."""
    position_at_save: Position
    """Of the straight run after iteration N."""
    eval_at_save: float
    scaler_at_save: list[dict[str, float]]
    helper_processes_after_save: list[str]
    finished_by_wait: list[int]
    """Iterations whose async save was finished by a wait (read before close() waits)."""


@dataclass
class Probe:
    """A load of another checkpoint: its iteration and held-out loss, or the error (ok False)."""

    ok: bool
    iteration: int | None
    eval: float | None
    error: str | None


@dataclass
class Probed:
    """Mode "resumed" with ``probe_only`` on one rank: other cases' checkpoints loaded into this
    layout, no checkpoint of its own."""

    branch: str
    probes: dict[str, Probe]


@dataclass
class Resumed:
    """Mode "resumed" on one rank: probes first, then its own checkpoint loaded, N more steps."""

    branch: str
    probes: dict[str, Probe]
    """Other cases' checkpoints (tests/resume_worlds.py FOREIGN) by probe name."""
    finetune: Probe | None
    """Another precision's checkpoint loaded with --finetune."""
    no_load_optim: list[dict] | None
    """exact() of two iterations after a load with --no-load-optim."""
    iteration: int
    consumed_samples: int
    position: Position
    eval_after_load: float
    adam_equals_saved: bool
    main_params_equal: bool
    main_param_dtypes: list[str]
    model_dtypes: list[str]
    scaler_after_load: list[dict[str, float]]
    adam_steps_after_load: list[float]
    adam_steps_after_one_more: list[float]
    optimizer_meta: dict[str, Any]
    records: list[dict]
    """exact() of the N iterations after the load."""


@dataclass
class Fresh:
    """A new run without a checkpoint: what --seed and the flags give."""

    rng: list[float]
    lr: dict[str, float]


@dataclass
class FlagLoad:
    """The fp32 two-rank checkpoint loaded with one flag, and exact() of the next iteration."""

    iteration: int
    consumed_samples: int
    lr: dict[str, float]
    rng: list[float]
    adam_empty_or_zero: bool
    eval: float
    next: dict


@dataclass
class LongerRun:
    """The checkpoint resumed with a larger --train-iters."""

    lr: dict[str, float]
    next: dict


@dataclass
class Flags:
    """Mode "flags" on one rank: one load per --no-load-* flag and --finetune."""

    fresh: Fresh
    no_load_optim: FlagLoad
    no_load_rng: FlagLoad
    finetune: FlagLoad
    no_load_scheduler: FlagLoad
    longer_run: LongerRun


def exact(record: dict) -> dict:
    """The part of an iteration record that must match bit for bit."""
    return {key: record[key] for key in EXACT_KEYS}


class Run:
    """A Trainer plus the probes the checkpoint tests read (RNG draws, Adam state, next samples)."""

    def __init__(self, cfg: MimoConfig) -> None:
        from megatron_mimo.training.trainer import Trainer

        self.cfg = cfg
        self.trainer = Trainer(cfg)
        self.job = self.trainer.job
        self.manager = self.trainer.checkpoints

    @property
    def state(self):
        return self.trainer.state

    def load(self) -> bool:
        return self.trainer.load()

    def save(self):
        return self.trainer.save()

    def step(self, inject_found_inf: bool = False, inject_overflow: bool = False) -> dict:
        """One iteration; optionally a found-inf verdict, or a real inf in the gradients, on the
        images ranks only."""
        opt = self.job.optimizer.module_infos[IMAGES].optimizer
        if inject_found_inf and opt is not None:
            opt.prepare_grads = lambda: True
        if inject_overflow and opt is not None:
            original = opt.prepare_grads

            def poisoned():
                next(self.job.branch_ddp.parameters()).main_grad.view(-1)[0] = float("inf")
                return original()

            opt.prepare_grads = poisoned
        record = self.trainer.step()
        if (inject_found_inf or inject_overflow) and opt is not None:
            del opt.prepare_grads
        return record

    def main_params(self) -> list[torch.Tensor]:
        """This rank's shard of the optimizer's fp32 main parameters."""
        from megatron_mimo.checkpoint.contents import inner_optimizers

        out = []
        for opt in inner_optimizers(self.job.optimizer):
            for name in ("shard_fp32_from_float16_groups", "shard_fp32_groups"):
                for group in getattr(opt, name, []):
                    out += [p.detach().clone() for p in group]
        return out

    def scaler_state(self) -> list[dict]:
        """State of this branch's loss scaler(s) (scale, growth and hysteresis trackers)."""
        from megatron_mimo.checkpoint.contents import inner_optimizers

        return [{k: float(v) for k, v in opt.grad_scaler.state_dict().items()}
                for opt in inner_optimizers(self.job.optimizer) if opt.grad_scaler is not None]

    def eval_loss(self) -> float:
        """Loss on fixed held-out batches, leaving every RNG stream untouched."""
        from megatron_mimo.checkpoint.rng import capture_rng, restore_rng

        saved = capture_rng()
        loss = self.trainer.evaluate().loss
        restore_rng(saved)
        return loss

    def rng_draws(self) -> list[float]:
        """One draw from every stream (python, numpy, torch, each tracker stream), then restore."""
        from megatron.core.tensor_parallel import random as mcore_random

        from megatron_mimo.checkpoint.rng import capture_rng, restore_rng

        saved = capture_rng()
        draws = [random.random(), float(np.random.rand()), torch.rand(1).item()]
        tracker = mcore_random.get_cuda_rng_tracker()
        for name in sorted(tracker.get_states()):
            with tracker.fork(name):
                draws.append(torch.rand(1).item())
        restore_rng(saved)
        return draws

    def next_indices(self) -> list[int]:
        return self.job.data.upcoming_indices()

    def adam_state(self) -> list[dict[str, torch.Tensor]]:
        from megatron_mimo.checkpoint.contents import inner_optimizers

        out = []
        for opt in inner_optimizers(self.job.optimizer):
            inner = opt.optimizer
            for group in inner.param_groups:
                for param in group["params"]:
                    state = inner.state.get(param, {})
                    out.append({k: v.detach().clone() for k, v in state.items()
                                if isinstance(v, torch.Tensor)})
        return out

    def adam_steps(self) -> list[float]:
        return [s["step"].item() for s in self.adam_state() if "step" in s]

    def close(self) -> None:
        self.trainer.close()


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Both lists hold tensors, the same ones bit for bit."""
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _same_adam(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def mode_straight_and_saved(args: dict) -> Saved:
    layout, root, extra = args["layout"], args["root"], args.get("overrides", {})
    overflow_at = args.get("inject_overflow_at")
    run_a = Run(make_cfg(layout, extra))
    a_records, position = [], None
    for it in range(2 * N):
        a_records.append(exact(run_a.step(inject_overflow=it + 1 == overflow_at)))
        if it + 1 == N:
            position = Position(run_a.rng_draws(), run_a.next_indices())
    run_a.close()
    # the production loop stops at --exit-interval right after requesting the save at N
    run_b = Run(make_cfg(layout, {"checkpoint.save": root, "checkpoint.save_interval": N,
                                  "training.exit_interval": N, **extra}))
    if overflow_at:  # an injected overflow needs single steps
        b_records = [exact(run_b.step(inject_overflow=it + 1 == overflow_at)) for it in range(N)]
        run_b.save()
    else:
        b_records = [exact(record) for record in run_b.trainer.run()]
    torch.save(run_b.main_params(), Path(root) / f"main_rank{dist.get_rank()}.pt")
    helpers = [p.name() for p in psutil.Process().children(recursive=True)]
    torch.save(run_b.adam_state(), Path(root) / f"adam_rank{dist.get_rank()}.pt")
    out = Saved(branch=run_b.job.branch, straight=a_records, until_save=b_records,
                position_at_save=position, eval_at_save=run_b.eval_loss(),
                scaler_at_save=run_b.scaler_state(), helper_processes_after_save=helpers,
                finished_by_wait=list(run_b.manager.finished_by_wait))  # before close() waits
    run_b.close()
    return out


def _probe(cfg: MimoConfig) -> Probe:
    """Load ``cfg``'s checkpoint; a refusal is the probe's result (its message is checked)."""
    probe = Run(cfg)
    try:
        probe.load()
        result = Probe(ok=True, iteration=probe.state.iteration, eval=probe.eval_loss(), error=None)
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        result = Probe(ok=False, iteration=None, eval=None, error=f"{type(error).__name__}: {error}")
    probe.close()
    return result


def mode_resumed(args: dict) -> Resumed | Probed:
    layout, root, extra = args["layout"], args["root"], args.get("overrides", {})
    probes = {name: _probe(make_cfg(layout, {"checkpoint.load": foreign_root, **extra}))
              for name, foreign_root in (args.get("foreign_roots") or {}).items()}
    if args.get("probe_only"):
        from megatron_mimo.config.layout import branch_of

        spec = branch_of(make_cfg(layout, extra).branch_specs(), dist.get_rank())
        return Probed(branch=spec.name, probes=probes)
    finetune = no_load_optim = None
    if args.get("finetune_root"):  # weights of a checkpoint in another precision
        finetune = _probe(make_cfg(layout, {"checkpoint.load": args["finetune_root"],
                                            "checkpoint.finetune": True, **extra}))
        assert finetune.ok, finetune.error
    if args.get("no_load_optim_probe"):  # weights only: main params must follow the weights
        probe = Run(make_cfg(layout, {"checkpoint.load": root, "checkpoint.no_load_optim": True,
                                      **extra}))
        probe.load()
        no_load_optim = [exact(probe.step()) for _ in range(2)]
        probe.close()
    run = Run(make_cfg(layout, {"checkpoint.load": root, **extra}))
    run.load()
    saved_adam = torch.load(Path(root) / f"adam_rank{dist.get_rank()}.pt")
    saved_main = torch.load(Path(root) / f"main_rank{dist.get_rank()}.pt")
    loaded = dict(
        branch=run.job.branch, main_params_equal=same_tensors(saved_main, run.main_params()),
        main_param_dtypes=sorted({str(p.dtype) for p in saved_main}),
        model_dtypes=sorted({str(p.dtype) for p in run.job.branch_ddp.parameters()}),
        scaler_after_load=run.scaler_state(), iteration=run.state.iteration,
        consumed_samples=run.state.consumed_samples,
        position=Position(run.rng_draws(), run.next_indices()), eval_after_load=run.eval_loss(),
        adam_equals_saved=_same_adam(run.adam_state(), saved_adam),
        adam_steps_after_load=run.adam_steps(),
        optimizer_meta=run.manager.loaded_optimizer_meta)
    records = [exact(run.step())]
    adam_steps_after_one_more = run.adam_steps()
    records += [exact(run.step()) for _ in range(N - 1)]
    run.close()
    return Resumed(probes=probes, finetune=finetune, no_load_optim=no_load_optim,
                   adam_steps_after_one_more=adam_steps_after_one_more, records=records, **loaded)


def _flag_load(flag: str, root: str) -> FlagLoad:
    run = Run(make_cfg(TWO_RANKS, {"checkpoint.load": root, f"checkpoint.{flag}": True}))
    run.load()
    loaded = dict(adam_empty_or_zero=all(not s or (s["exp_avg"].abs().sum() == 0)
                                         for s in run.adam_state()),
                  iteration=run.state.iteration, consumed_samples=run.state.consumed_samples,
                  lr=run.job.schedulers.lrs(), rng=run.rng_draws(), eval=run.eval_loss())
    result = FlagLoad(**loaded, next=exact(run.step()))
    run.close()
    return result


def mode_flags(args: dict) -> Flags:
    fresh = Run(make_cfg(TWO_RANKS))
    fresh_result = Fresh(rng=fresh.rng_draws(), lr=fresh.job.schedulers.lrs())
    fresh.close()
    loads = {flag: _flag_load(flag, args["root"])
             for flag in ("no_load_optim", "no_load_rng", "finetune", "no_load_scheduler")}
    longer = Run(make_cfg(TWO_RANKS, {"checkpoint.load": args["root"], "training.train_iters": 4 * N}))
    longer.load()
    longer_run = LongerRun(lr=longer.job.schedulers.lrs(), next=exact(longer.step()))
    longer.close()
    return Flags(fresh=fresh_result, longer_run=longer_run, **loads)


MODES = {"straight_and_saved": mode_straight_and_saved, "resumed": mode_resumed,
         "flags": mode_flags, "repeated_async_saves": mode_repeated_async_saves}


def body(args: dict) -> Any:
    """One mode, or ``{"runs": [args, ...]}``: several in turn in these processes (each world
    start costs ~10 s of imports and set-up; the test suite shares them)."""
    forbid_parallel_state_groups()
    if "runs" in args:
        return [MODES[run["mode"]](run) for run in args["runs"]]
    return MODES[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
