"""Freezing world: the real job on 4 ranks with --freeze-vit / --freeze-projection / --freeze-lm.

One world (mode-less), several jobs in turn, images TP1xDP2 on ranks 0-1:
    :data:`HETERO_CASES` on language TP2 (``tiny_cpu``), :data:`HETERO_ITERS` steps each, then an
    evaluation (the frozen parts must be in eval mode afterwards);
    :data:`PIPELINE_CASES` on language TP1xPP2 (``tiny_cpu_pp``), :data:`PIPELINE_ITERS` steps.
Cases in :data:`RESUMED` save before their last step and a second job resumes from there (a
branch with nothing to train has no optimizer state). Each rank returns a :class:`FreezeWorld`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_mimo.config import MimoConfig
from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.presets import tiny_cpu, tiny_cpu_pp
from megatron_mimo.models.freezing import PARTS, frozen_parts, parameter_counts
from tests.workers.common import worker_main

HETERO_ITERS = 3
PIPELINE_ITERS = 10
HETERO_CASES: dict[str, dict[str, bool]] = {
    "vit": {"training.freeze_vit": True},
    "projection": {"training.freeze_projection": True},
    "lm": {"training.freeze_lm": True},
    "stage1": {"training.freeze_vit": True, "training.freeze_lm": True},
}
PIPELINE_CASES: dict[str, dict[str, bool]] = {
    "images_frozen_pp": {"training.freeze_vit": True, "training.freeze_projection": True},
    "lm_frozen_pp": {"training.freeze_lm": True},
}
RESUMED = ("stage1", "images_frozen_pp")
"""One case whose language branch, one whose images branch has nothing to train."""


@dataclass
class PartResult:
    """One part (vit / projection / lm) of this rank's branch after the run."""

    frozen: bool
    """The flags froze it."""
    requires_grad: bool
    """Some parameter of it has requires_grad."""
    unchanged: bool
    """Every tensor is bit-identical to its value before the first step."""
    all_changed: bool
    """Every tensor differs from its value before the first step."""
    trainable: int
    frozen_count: int
    eval_mode: bool
    """Every module of the part is in eval mode (after the evaluation, if one ran)."""
    train_mode: bool
    """Every module of the part is in training mode."""


@dataclass
class CaseRun:
    """One job on one rank."""

    branch: str
    stage: int
    parts: dict[str, PartResult]
    records: list[dict]
    branch_norms: list[float]
    """This branch's own grad norm at every step (empty: the branch has no optimizer)."""
    local_trainable: int
    """Trainable parameters held on this rank (its TP shard and stage)."""
    optimizer_params: int
    """Parameters this rank's DistributedOptimizer shard updates, summed over the DP group."""
    stub_optimizer: bool
    """This rank's MimoOptimizer has no active optimizer."""
    resumed: list[dict]
    """Records of a job resumed from the save before the last step (cases in RESUMED)."""


@dataclass
class StageTwo:
    """Stage 2 (only the vision tower frozen) loaded from the stage-1 save, on one rank."""

    refused: str
    """The one-line error of a plain --load (the optimizer state trained another set)."""
    records: list[dict]
    """Steps after --finetune from the stage-1 save."""
    language_changed: bool
    """The language model (frozen in stage 1) moved in stage 2."""


@dataclass
class FreezeWorld:
    """The world on one rank."""

    world_rank: int
    cases: dict[str, CaseRun]
    stage_two: StageTwo


def make_cfg(preset, overrides: dict[str, Any], iters: int) -> MimoConfig:
    base = {"scheduler.lr_warmup_iters": 0, "training.train_iters": iters}
    return apply_overrides(preset(), {**base, **overrides})


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):  # DDP, Float16Module
        module = module.module
    return module


def _capture_norms(trainer) -> list[float]:
    norms: list[float] = []
    optimizer = trainer.job.optimizer.module_infos[trainer.branch].optimizer
    if optimizer is not None:
        compute = optimizer.get_grad_norm
        optimizer.get_grad_norm = lambda: norms.append(float(compute())) or norms[-1]
    return norms


def _optimizer_params(trainer) -> int:
    optimizer = trainer.job.optimizer.module_infos[trainer.branch].optimizer
    local = 0 if optimizer is None else sum(
        p.numel() for group in optimizer.param_groups for p in group["params"])
    total = torch.tensor([local])
    dist.all_reduce(total, group=trainer.job.topology.pgs().dp)
    return int(total.item())


def _parts(cfg: MimoConfig, trainer, inner: torch.nn.Module, before: dict) -> dict[str, PartResult]:
    branch = trainer.branch
    frozen = frozen_parts(cfg.training, branch)
    counts = parameter_counts(inner, branch, trainer.job.topology.tp_rank())
    parts = {}
    for part, path in PARTS[branch].items():
        prefix = path + "." if path else ""
        named = [(n, p) for n, p in inner.named_parameters() if n.startswith(prefix)]
        same = [torch.equal(before[n], p.detach()) for n, p in named]
        modules = list(inner.get_submodule(path).modules())
        parts[part] = PartResult(
            frozen=part in frozen, requires_grad=any(p.requires_grad for _, p in named),
            unchanged=all(same), all_changed=not any(same), trainable=counts[part].trainable,
            frozen_count=counts[part].frozen, eval_mode=not any(m.training for m in modules),
            train_mode=all(m.training for m in modules))
    return parts


def run_case(cfg: MimoConfig, iters: int, evaluate: bool, save: str | None) -> CaseRun:
    """Train ``iters`` steps (saving before the last one into ``save``), optionally evaluate,
    then (with ``save``) resume a second job from the save and run the last step again."""
    from megatron_mimo.training.trainer import Trainer

    if save:
        cfg = apply_overrides(cfg, {"checkpoint.save": save})
    with Trainer(cfg) as trainer:
        inner = _unwrap(trainer.job.branch_ddp)
        before = {name: p.detach().clone() for name, p in inner.named_parameters()}
        norms = _capture_norms(trainer)
        records = []
        for it in range(1, iters + 1):
            if save and it == iters:
                trainer.save()
            records.append(trainer.step())
        if evaluate:
            trainer.evaluate()
        run = CaseRun(branch=trainer.branch, stage=trainer.job.topology.pgs().pp.rank(),
                      parts=_parts(cfg, trainer, inner, before), records=records,
                      branch_norms=norms,
                      local_trainable=sum(p.numel() for p in inner.parameters() if p.requires_grad),
                      optimizer_params=_optimizer_params(trainer),
                      stub_optimizer=trainer.job.optimizer.is_stub_optimizer, resumed=[])
    if save:
        with Trainer(apply_overrides(cfg, {"checkpoint.load": save})) as trainer:
            assert trainer.load()
            run.resumed = [trainer.step()]
    return run


def stage_two(stage1: str) -> StageTwo:
    """Stage 2 from the stage-1 checkpoint: refused with its optimizer state, fine with
    --finetune (weights only; a fresh optimizer for the new trainable set)."""
    from megatron_mimo.errors import CheckpointError
    from megatron_mimo.training.trainer import Trainer

    cfg = make_cfg(tiny_cpu, {"training.freeze_vit": True, "checkpoint.load": stage1}, 2)
    refused = ""
    with Trainer(cfg) as trainer:
        try:
            trainer.load()
        except CheckpointError as error:
            refused = str(error)
    with Trainer(apply_overrides(cfg, {"checkpoint.finetune": True})) as trainer:
        assert trainer.load()
        params = [p.detach().clone() for p in trainer.job.branch_ddp.parameters()]
        records = [trainer.step() for _ in range(2)]
        moved = any(not torch.equal(a, b) for a, b in zip(params, trainer.job.branch_ddp.parameters(),
                                                          strict=True))
        language = trainer.branch == "language"
    return StageTwo(refused, records, moved and language)


def body(args: dict[str, Any]) -> Any:
    def save_dir(name: str) -> str | None:
        return os.path.join(args["root"], name) if name in RESUMED else None

    cases = {name: run_case(make_cfg(tiny_cpu, over, HETERO_ITERS), HETERO_ITERS,
                            evaluate=True, save=save_dir(name))
             for name, over in HETERO_CASES.items()}
    for name, over in PIPELINE_CASES.items():
        cases[name] = run_case(make_cfg(tiny_cpu_pp, over, PIPELINE_ITERS), PIPELINE_ITERS,
                               evaluate=False, save=save_dir(name))
    return FreezeWorld(world_rank=dist.get_rank(), cases=cases,
                       stage_two=stage_two(save_dir("stage1")))


if __name__ == "__main__":
    worker_main(body)
