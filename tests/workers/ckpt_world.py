"""Checkpoint worlds: straight vs saved-and-resumed runs and the load flags, plus the ``Run``
probes they share with :mod:`tests.workers.ckpt_failure_world`.

Modes (args["mode"]):
  "straight_and_saved"  2N iterations straight; then N iterations, save, stop (same processes)
  "resumed"             fresh processes: load that checkpoint, check it, train N more
  "flags"               load one checkpoint several times with --no-load-* / --finetune
Every record is the production iteration record (``Trainer.step()``). ``{"runs": [...]}``
runs several modes in turn in the same processes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_mimo.config import IMAGES, MimoConfig
from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.presets import tiny_cpu, tiny_cpu_nemotron
from tests.workers.common import forbid_parallel_state_groups, worker_main

N = 3
LAYOUTS = {
    "images_tp1dp2_language_tp2dp1": {},
    "images_tp2dp1_language_tp1dp2": {
        "images_parallel.tp": 2, "images_parallel.dp": 1, "language_parallel.tp": 1,
        "language_parallel.dp": 2, "training.micro_batch_size": 1},
    "images_tp1dp1_language_tp1dp1": {
        "images_parallel.dp": 1, "language_parallel.tp": 1, "language_parallel.offset": 1},
    "images_tp1dp3_language_tp1dp1": {
        "images_parallel.dp": 3, "language_parallel.tp": 1, "language_parallel.offset": 3,
        "training.micro_batch_size": 3, "training.global_batch_size": 6},
    "nemotron_images_tp1dp2_language_tp2dp1": {},  # RADIO + Mamba hybrid
    "images_tp1dp2_language_pp2": {  # language over 2 pipeline stages, 4 micro-batches
        "language_parallel.tp": 1, "language_parallel.pp": 2},
}
PRESET = {"nemotron_images_tp1dp2_language_tp2dp1": tiny_cpu_nemotron}
TWO_RANKS = "images_tp1dp1_language_tp1dp1"
UNEVEN = "images_tp1dp3_language_tp1dp1"
EXACT_KEYS = ("iteration", "consumed_samples", "loss", "grad_norm", "lr", "num_tokens", "skipped",
              "skipped_iterations", "consumed_tokens", "floating_point_operations", "loss_scale")
"""Keys of the production iteration record that a resume must reproduce bit for bit."""


def make_cfg(layout: str, overrides: dict[str, Any] | None = None) -> MimoConfig:
    base = {"images.hidden_dropout": 0.1, "images.attention_dropout": 0.1,
            "language.hidden_dropout": 0.1, "language.attention_dropout": 0.1,
            "scheduler.lr_warmup_iters": N + 1, "training.train_iters": 2 * N,
            "training.global_batch_size": 8, "training.eval_iters": 1,
            "checkpoint.ckpt_timeout_s": 20}
    return apply_overrides(PRESET.get(layout, tiny_cpu)(),
                           {**base, **LAYOUTS[layout], **(overrides or {})})


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


def _same_adam(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def mode_straight_and_saved(args: dict) -> dict:
    layout, root = args["layout"], args["root"]
    extra = args.get("overrides", {})
    overflow_at = args.get("inject_overflow_at")
    run_a = Run(make_cfg(layout, extra))
    a_records, snapshot = [], {}
    for it in range(2 * N):
        a_records.append(exact(run_a.step(inject_overflow=it + 1 == overflow_at)))
        if it + 1 == N:
            snapshot = {"rng": run_a.rng_draws(), "indices": run_a.next_indices()}
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
    import psutil

    helpers = [p.name() for p in psutil.Process().children(recursive=True)]
    adam = run_b.adam_state()
    torch.save(adam, Path(root) / f"adam_rank{dist.get_rank()}.pt")
    out = {"straight": a_records, "until_save": b_records, "snapshot": snapshot, "eval_at_save": run_b.eval_loss(),
           "save_seconds": run_b.manager.last_save_seconds, "branch": run_b.job.branch,
           "helper_processes_after_save": helpers, "scaler_at_save": run_b.scaler_state(),
           "finished_by_wait": list(run_b.manager.finished_by_wait)}  # before close() waits
    run_b.close()
    return out


def _probe_foreign(layout: str, extra: dict, foreign: dict[str, str]) -> dict:
    out: dict[str, Any] = {}
    for name, foreign_root in foreign.items():  # checkpoints saved under another layout
        probe = Run(make_cfg(layout, {"checkpoint.load": foreign_root, **extra}))
        try:
            probe.load()
            out[name] = {"ok": True, "iteration": probe.state.iteration,
                         "eval": probe.eval_loss()}
        except Exception as error:  # noqa: BLE001 - the message is what the test checks
            out[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        probe.close()
    return out


def mode_resumed(args: dict) -> dict:
    layout, root = args["layout"], args["root"]
    extra = args.get("overrides", {})
    foreign = dict(args.get("foreign_roots") or {})
    out = _probe_foreign(layout, extra, foreign)
    if args.get("finetune_root"):  # weights of a checkpoint in another precision
        probe = Run(make_cfg(layout, {"checkpoint.load": args["finetune_root"],
                                      "checkpoint.finetune": True, **extra}))
        probe.load()
        out["finetune"] = {"iteration": probe.state.iteration, "eval": probe.eval_loss()}
        probe.close()
    if args.get("no_load_optim_probe"):  # weights only: main params must follow the weights
        probe = Run(make_cfg(layout, {"checkpoint.load": root, "checkpoint.no_load_optim": True,
                                      **extra}))
        probe.load()
        out["no_load_optim"] = [exact(probe.step()) for _ in range(2)]
        probe.close()
    run = Run(make_cfg(layout, {"checkpoint.load": root, **extra}))
    run.load()
    saved_adam = torch.load(Path(root) / f"adam_rank{dist.get_rank()}.pt")
    saved_main = torch.load(Path(root) / f"main_rank{dist.get_rank()}.pt")
    out["main_params_equal"] = len(saved_main) > 0 and all(
        torch.equal(a, b) for a, b in zip(saved_main, run.main_params(), strict=True))
    out["main_param_dtypes"] = sorted({str(p.dtype) for p in saved_main})
    out["model_dtypes"] = sorted({str(p.dtype) for p in run.job.branch_ddp.parameters()})
    out["scaler_after_load"] = run.scaler_state()
    out.update({
        "iteration": run.state.iteration, "consumed_samples": run.state.consumed_samples,
        "rng": run.rng_draws(), "indices": run.next_indices(), "eval_after_load": run.eval_loss(),
        "adam_equal": _same_adam(run.adam_state(), saved_adam), "steps_after_load": run.adam_steps(),
        "optimizer_meta": run.manager.loaded_optimizer_meta, "branch": run.job.branch,
        "load_seconds": run.manager.last_load_seconds,
    })
    records = [exact(run.step())]
    out["steps_after_one_more"] = run.adam_steps()
    records += [exact(run.step()) for _ in range(N - 1)]
    out["records"] = records
    run.close()
    return out


def mode_flags(args: dict) -> dict:
    root, out = args["root"], {}
    fresh = Run(make_cfg(TWO_RANKS))
    out["fresh"] = {"rng": fresh.rng_draws(), "lr": fresh.job.schedulers.lrs()}
    fresh.close()
    for flag in ("no_load_optim", "no_load_rng", "finetune", "no_load_scheduler"):
        run = Run(make_cfg(TWO_RANKS, {"checkpoint.load": root, f"checkpoint.{flag}": True}))
        run.load()
        adam = run.adam_state()
        out[flag] = {"iteration": run.state.iteration,
                     "consumed_samples": run.state.consumed_samples,
                     "lr": run.job.schedulers.lrs(), "rng": run.rng_draws(),
                     "adam_empty_or_zero": all(not s or (s["exp_avg"].abs().sum() == 0) for s in adam),
                     "eval": run.eval_loss()}
        out[flag]["next"] = exact(run.step())
        run.close()
    longer = Run(make_cfg(TWO_RANKS, {"checkpoint.load": root, "training.train_iters": 4 * N}))
    longer.load()
    out["longer_run"] = {"lr": longer.job.schedulers.lrs(), "next": exact(longer.step())}
    longer.close()
    return out


MODES = {"straight_and_saved": mode_straight_and_saved, "resumed": mode_resumed,
         "flags": mode_flags}


def body(args: dict) -> Any:
    """One mode, or ``{"runs": [args, ...]}``: several in turn in these processes (each world
    start costs ~10 s of imports and set-up; the test suite shares them)."""
    forbid_parallel_state_groups()
    if "runs" in args:
        return [MODES[run["mode"]](run) for run in args["runs"]]
    return MODES[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
