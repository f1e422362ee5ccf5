"""Checkpoint worlds: straight vs saved-and-resumed runs, flags, structure, failures.

Modes (args["mode"]):
  "ab"       run A: 2N iterations straight; run B: N iterations, save, stop (same processes)
  "c"        fresh processes: load B's checkpoint, check it, train N more
  "flags"    load one checkpoint several times with --no-load-* / --finetune
  "features" uneven DP3 optimizer shards, constant structure with optional state, mismatches
  "crash"    train with a save every iteration while a rank dies inside one save
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_mimo.cli import apply_overrides
from megatron_mimo.config import IMAGES, MimoConfig
from megatron_mimo.presets import tiny_cpu, tiny_cpu_nemotron
from tests.workers.common import forbid_parallel_state_groups, worker_main

N = 3
LAYOUTS = {
    "L1": {},  # images TP1xDP2 on 0-1, language TP2xDP1 on 2-3
    "L2": {"encoder_parallel.tp": 2, "encoder_parallel.dp": 1, "language_parallel.tp": 1,
           "language_parallel.dp": 2, "training.micro_batch_size": 1},
    "L3": {"encoder_parallel.dp": 1, "language_parallel.tp": 1, "language_parallel.offset": 1},
    "DP3": {"encoder_parallel.dp": 3, "language_parallel.tp": 1, "language_parallel.offset": 3,
            "training.micro_batch_size": 3, "training.global_batch_size": 6},
    "NEMO": {},  # tiny_cpu_nemotron: RADIO TP1xDP2 on 0-1, Mamba hybrid TP2xDP1 on 2-3
}
PRESET = {"NEMO": tiny_cpu_nemotron}


def make_cfg(layout: str, **overrides: Any) -> MimoConfig:
    base = {"encoder.hidden_dropout": 0.1, "encoder.attention_dropout": 0.1,
            "language.hidden_dropout": 0.1, "language.attention_dropout": 0.1,
            "scheduler.lr_warmup_iters": N + 1, "training.train_iters": 2 * N,
            "training.global_batch_size": 8, "training.eval_iters": 1,
            "checkpoint.ckpt_timeout_s": 20}
    dotted = {k.replace("__", "."): v for k, v in overrides.items()}
    return apply_overrides(PRESET.get(layout, tiny_cpu)(), {**base, **LAYOUTS[layout], **dotted})


class Run:
    """One job on this rank (topology, model, optimizer, checkpoint manager)."""

    def __init__(self, cfg: MimoConfig) -> None:
        from megatron_mimo.checkpoint import CheckpointManager
        from megatron_mimo.job import build_job
        from megatron_mimo.runtime import select_runtime
        from megatron_mimo.topology import build_topology
        from megatron_mimo.train import TrainState

        self.cfg = cfg
        self.job = build_job(cfg, select_runtime(), build_topology(cfg.branch_specs()))
        self.manager = CheckpointManager(self.job)
        self.state = TrainState()

    def load(self):
        loaded = self.manager.load()
        if loaded is not None:
            self.state = loaded
        return loaded

    def step(self, inject_found_inf: bool = False) -> dict:
        from megatron_mimo.train import advance, train_step

        opt = self.job.optimizer.module_infos[IMAGES].optimizer
        if inject_found_inf and opt is not None:
            opt.prepare_grads = lambda: True
        result = train_step(self.job, self.state)
        if inject_found_inf and opt is not None:
            del opt.prepare_grads
        advance(self.state, result, self.cfg.training.global_batch_size, self.job.num_parameters)
        return {"iteration": self.state.iteration, "loss": result.loss, "grad_norm": result.grad_norm,
                "lr": self.job.schedulers.lrs(), "consumed": self.state.consumed_samples,
                "tokens": self.state.consumed_tokens, "flops": self.state.floating_point_operations,
                "skipped": result.skipped}

    def eval_loss(self) -> float:
        """Loss on fixed held-out batches, leaving every RNG stream untouched."""
        from megatron_mimo.ckpt_state import capture_rng, restore_rng
        from megatron_mimo.train import evaluate

        saved = capture_rng()
        loss = evaluate(self.job)
        restore_rng(saved)
        return loss

    def rng_draws(self) -> list[float]:
        """One draw from every stream (python, numpy, torch, each tracker stream), then restore."""
        from megatron.core.tensor_parallel import random as mcore_random

        from megatron_mimo.ckpt_state import capture_rng, restore_rng

        saved = capture_rng()
        draws = [random.random(), float(np.random.rand()), torch.rand(1).item()]
        tracker = mcore_random.get_cuda_rng_tracker()
        for name in sorted(tracker.get_states()):
            with tracker.fork(name):
                draws.append(torch.rand(1).item())
        restore_rng(saved)
        return draws

    def next_indices(self) -> list[int]:
        return self.job.sampler.indices(self.state.consumed_samples, 0)

    def adam_state(self) -> list[dict[str, torch.Tensor]]:
        from megatron_mimo.ckpt_state import inner_optimizers

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
        from megatron_mimo.job import destroy_job

        self.manager.close()
        destroy_job(self.job)


def _same_adam(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def mode_ab(args: dict) -> dict:
    layout, root = args["layout"], args["root"]
    extra = args.get("overrides", {})
    run_a = Run(make_cfg(layout, **extra))
    a_records, snapshot = [], {}
    for it in range(2 * N):
        a_records.append(run_a.step())
        if it + 1 == N:
            snapshot = {"rng": run_a.rng_draws(), "indices": run_a.next_indices()}
    run_a.close()
    run_b = Run(make_cfg(layout, checkpoint__save=root, **extra))
    b_records = [run_b.step() for _ in range(N)]
    run_b.manager.save(run_b.state)
    import psutil

    helpers = [p.name() for p in psutil.Process().children(recursive=True)]
    adam = run_b.adam_state()
    torch.save(adam, Path(root) / f"adam_rank{dist.get_rank()}.pt")
    out = {"a": a_records, "b": b_records, "snapshot": snapshot, "eval_at_save": run_b.eval_loss(),
           "save_seconds": run_b.manager.last_save_seconds, "branch": run_b.job.branch,
           "helper_processes_after_save": helpers}
    run_b.close()
    return out


def mode_c(args: dict) -> dict:
    layout, root = args["layout"], args["root"]
    extra = args.get("overrides", {})
    out: dict[str, Any] = {}
    if args.get("foreign_root"):  # a checkpoint saved under another layout
        probe = Run(make_cfg(layout, checkpoint__load=args["foreign_root"], **extra))
        try:
            probe.load()
            out["foreign"] = {"ok": True, "iteration": probe.state.iteration,
                              "eval": probe.eval_loss()}
        except Exception as error:  # noqa: BLE001 - the message is what the test checks
            out["foreign"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        probe.close()
    run = Run(make_cfg(layout, checkpoint__load=root, **extra))
    run.load()
    saved_adam = torch.load(Path(root) / f"adam_rank{dist.get_rank()}.pt")
    out.update({
        "iteration": run.state.iteration, "consumed": run.state.consumed_samples,
        "rng": run.rng_draws(), "indices": run.next_indices(), "eval_after_load": run.eval_loss(),
        "adam_equal": _same_adam(run.adam_state(), saved_adam), "steps_after_load": run.adam_steps(),
        "optimizer_meta": run.manager.loaded_optimizer_meta, "branch": run.job.branch,
        "load_seconds": run.manager.last_load_seconds,
    })
    records = [run.step()]
    out["steps_after_one_more"] = run.adam_steps()
    records += [run.step() for _ in range(N - 1)]
    out["records"] = records
    run.close()
    return out


def mode_flags(args: dict) -> dict:
    root, out = args["root"], {}
    fresh = Run(make_cfg("L3"))
    out["fresh"] = {"rng": fresh.rng_draws(), "lr": fresh.job.schedulers.lrs()}
    fresh.close()
    for flag in ("no_load_optim", "no_load_rng", "finetune", "no_load_scheduler"):
        run = Run(make_cfg("L3", checkpoint__load=root, **{f"checkpoint__{flag}": True}))
        run.load()
        adam = run.adam_state()
        out[flag] = {"iteration": run.state.iteration, "consumed": run.state.consumed_samples,
                     "lr": run.job.schedulers.lrs(), "rng": run.rng_draws(),
                     "adam_empty_or_zero": all(not s or (s["exp_avg"].abs().sum() == 0) for s in adam),
                     "eval": run.eval_loss()}
        out[flag]["next"] = run.step()
        run.close()
    longer = Run(make_cfg("L3", checkpoint__load=root, training__train_iters=4 * N))
    longer.load()
    out["longer_run"] = {"lr": longer.job.schedulers.lrs(), "next": longer.step()}
    longer.close()
    return out


def mode_features(args: dict) -> dict:
    root, out = args["root"], {}
    run = Run(make_cfg("DP3", checkpoint__save=root, checkpoint__ckpt_timeout_s=5))
    shard = sum(p.numel() for opt_group in run.job.optimizer.param_groups for p in opt_group["params"])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (run.job.branch, shard))
    out["shards"] = gathered
    run.step()
    run.manager.save(run.state)
    first = run.manager.last_fingerprint
    run.step(inject_found_inf=True)  # optional state (skip history) becomes non-empty
    run.manager.save(run.state)
    out["fingerprints"] = [first, run.manager.last_fingerprint]
    out["eval_at_save"] = run.eval_loss()
    run.close()
    reload = Run(make_cfg("DP3", checkpoint__load=root, checkpoint__save=root + "_again",
                          checkpoint__ckpt_timeout_s=5))
    reload.load()
    out["reloaded"] = {"iteration": reload.state.iteration, "skipped_at": reload.state.skipped_at,
                       "eval": reload.eval_loss()}
    out["mismatch"] = _save_error(reload, bump_iteration_on_rank=dist.get_world_size() - 1)
    out["missing"] = _save_error(reload, skip_on_rank=dist.get_world_size() - 1)
    return out


def _save_error(run: Run, bump_iteration_on_rank: int | None = None,
                skip_on_rank: int | None = None) -> dict:
    import copy

    rank = dist.get_rank()
    if rank == skip_on_rank:
        time.sleep(run.cfg.checkpoint.ckpt_timeout_s + 5)  # busy elsewhere, never saves
        return {"skipped": True}
    state = copy.deepcopy(run.state)
    if rank == bump_iteration_on_rank:
        state.iteration += 1
    start = time.monotonic()
    try:
        run.manager.save(state)
        return {"error": None}
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - start}


def mode_crash(args: dict) -> dict:
    run = Run(make_cfg("L3", checkpoint__save=args["root"], checkpoint__load=args["root"],
                       checkpoint__ckpt_timeout_s=10))
    run.load()
    start = run.state.iteration
    records = []
    for _ in range(args["iterations"]):
        records.append(run.step())
        run.manager.save(run.state)
    run.close()
    return {"start": start, "records": records}


MODES = {"ab": mode_ab, "c": mode_c, "flags": mode_flags, "features": mode_features,
         "crash": mode_crash}


def body(args: dict) -> Any:
    forbid_parallel_state_groups()
    return MODES[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
