"""Build the sharded state dict of a save (or a load template) and apply a loaded one.

Which pieces take part is decided by a :class:`LoadPlan` made from the flags and, on load, from
the checkpoint's manifest; every rank derives the same plan, so every rank runs the same
collectives.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from megatron_mimo.ckpt_state import (
    branch_object,
    capture_rng,
    ensure_adam_state,
    inner_optimizers,
    rank_object,
    rebuild_adam_steps,
    restore_rng,
)
from megatron_mimo.config import BRANCHES, CheckpointConfig, ParallelismConfig
from megatron_mimo.errors import CheckpointError
from megatron_mimo.job import Job

logger = logging.getLogger(__name__)

FORMAT = "megatron-mimo/1"


@dataclass(frozen=True)
class LoadPlan:
    """Which pieces a save writes or a load reads."""

    save: bool
    optimizer: bool
    scheduler: bool
    rng: bool
    progress: bool
    """Train state, data position and skip history (off with --finetune)."""
    sharding_type: str

    @classmethod
    def for_save(cls, ckpt: CheckpointConfig) -> LoadPlan:
        return cls(save=True, optimizer=not ckpt.no_save_optim, scheduler=True,
                   rng=not ckpt.no_save_rng, progress=True,
                   sharding_type=ckpt.optimizer_sharding_type)

    @classmethod
    def for_load(cls, ckpt: CheckpointConfig, manifest: dict[str, Any], job: Job) -> LoadPlan:
        contents = set(manifest["contents"])
        optimizer = not (ckpt.finetune or ckpt.no_load_optim)
        if optimizer and "optimizer" not in contents:
            raise CheckpointError("the checkpoint holds no optimizer state (saved with "
                                  "--no-save-optim): resume with --no-load-optim or --finetune")
        check_layout(manifest, job, optimizer)
        same_ranks = all(_saved_parallel(manifest, b) == job.cfg.parallel(b) for b in BRANCHES)
        rng = not (ckpt.finetune or ckpt.no_load_rng) and "rng" in contents
        if rng and not same_ranks:
            logger.warning("layout changed since the save: RNG state is per rank and is not loaded")
            rng = False
        return cls(save=False, optimizer=optimizer,
                   scheduler=not (ckpt.finetune or ckpt.no_load_scheduler), rng=rng,
                   progress=not ckpt.finetune, sharding_type=manifest["optimizer_sharding_type"])


def _saved_parallel(manifest: dict[str, Any], branch: str) -> ParallelismConfig:
    return ParallelismConfig(**manifest["topology"][branch])


def check_layout(manifest: dict[str, Any], job: Job, loads_optimizer: bool) -> None:
    """Refuse, before any collective, a resume the saved optimizer format cannot reshard to."""
    for branch in BRANCHES:
        saved, now = _saved_parallel(manifest, branch), job.cfg.parallel(branch)
        model_parallel_changed = (saved.tp, saved.pp) != (now.tp, now.pp)
        if (loads_optimizer and model_parallel_changed
                and manifest["optimizer_sharding_type"] != "fully_reshardable"):
            raise CheckpointError(
                f"cannot resume the {branch} branch: the checkpoint was saved with "
                f"{saved.spec(branch).describe()} and optimizer format "
                f"'{manifest['optimizer_sharding_type']}', which reshards only across DP; this run "
                f"uses {now.spec(branch).describe()}. Resume with the saved TP/PP, save with "
                f"--dist-ckpt-optim-fully-reshardable, or load weights only (--no-load-optim / --finetune)")


def build_state(job: Job, state, plan: LoadPlan) -> dict[str, Any]:
    """This rank's sharded state dict (``state`` is the TrainState on save, None on load)."""
    branch, pgs = job.branch, job.topology.pgs()
    spec = job.topology.spec(branch)
    model_sd = job.model.sharded_state_dict()
    sharded: dict[str, Any] = {"model": model_sd}
    if plan.optimizer:
        for optimizer in inner_optimizers(job.optimizer):
            ensure_adam_state(optimizer)
        sharded["optimizer"] = job.optimizer.sharded_state_dict(
            model_sd, is_loading=not plan.save,
            metadata={"distrib_optim_sharding_type": plan.sharding_type})
    if plan.scheduler:  # a save writes this branch's; a load reads every branch's (for logging)
        names = [branch] if plan.save else list(job.schedulers.schedulers)
        sharded["scheduler"] = {name: branch_object(
            f"scheduler.{name}", job.schedulers.schedulers[name].state_dict(), pgs,
            foreign=name != branch) for name in names}
    if plan.progress:
        consumed = state.consumed_samples if state is not None else 0
        skipped = list(state.skipped_at) if state is not None else []
        sharded["data"] = branch_object(f"data.{branch}", {"consumed_samples": consumed}, pgs)
        sharded["events"] = branch_object(f"events.{branch}", {"skipped_at": skipped}, pgs)
    if plan.rng:
        sharded["rng"] = rank_object(f"rng.{branch}", capture_rng(),
                                     job.topology.rank - spec.rank_offset, spec.num_ranks)
    if plan.save:
        sharded["train_state"] = {k: v for k, v in dataclasses.asdict(state).items()
                                  if k != "stopped_early"}
        sharded["config"] = job.cfg.to_dict()
    return sharded


def manifest_for(job: Job, state, fingerprint: str, sharded: dict[str, Any]) -> dict[str, Any]:
    """Small description of a checkpoint, identical on every rank (common state + JSON file)."""
    from megatron.core.package_info import __version__ as mcore_version

    return {
        "format": FORMAT, "megatron_core_version": mcore_version, "iteration": state.iteration,
        "optimizer_sharding_type": job.cfg.checkpoint.optimizer_sharding_type,
        "topology": {b: dataclasses.asdict(job.cfg.parallel(b)) for b in BRANCHES},
        "world_size": job.topology.world_size, "sharded_keys_fingerprint": fingerprint,
        "contents": sorted(k for k in ("model", "optimizer", "scheduler", "rng", "data", "events")
                           if k in sharded),
        "config_name": job.cfg.name,
    }


def apply_loaded(job: Job, loaded: dict[str, Any], plan: LoadPlan):
    """Install a loaded state dict into the job; return the TrainState to continue from."""
    from megatron_mimo.train import TrainState

    branch = job.branch
    job.model.load_state_dict(loaded["model"], strict=True)
    if plan.optimizer:
        with torch.no_grad():  # distrib_optimizer.py:1225 copies into views of leaf params
            job.optimizer.load_state_dict(loaded["optimizer"])
        for optimizer in inner_optimizers(job.optimizer):
            rebuild_adam_steps(optimizer)
    if plan.scheduler:
        _load_schedulers(job, loaded["scheduler"])
    if not plan.progress:
        return TrainState()
    state = TrainState(**loaded["train_state"])
    consumed = loaded["data"]["consumed_samples"]
    if consumed != state.consumed_samples:
        raise CheckpointError(f"{branch} data position {consumed} disagrees with the train state "
                              f"({state.consumed_samples} consumed samples)")
    if plan.rng:
        restore_rng(loaded["rng"])
    return state


def _load_schedulers(job: Job, states: dict[str, dict[str, Any]]) -> None:
    """Restore every branch's scheduler (this rank's is real, the others drive LR logging)."""
    for name, scheduler in job.schedulers.schedulers.items():
        saved = states[name]
        changed = {k: (v, saved[k]) for k, v in scheduler.state_dict().items()
                   if k != "num_steps" and saved.get(k) != v}
        if changed and name == job.branch:
            logger.warning("%s LR schedule: the checkpoint's values win over the flags: %s "
                           "(flag value, checkpoint value)", name, changed)
        scheduler.num_steps = 0  # load_state_dict *adds* the saved steps (no double stepping)
        scheduler.load_state_dict(saved)
