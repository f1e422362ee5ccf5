"""Per-branch DistributedOptimizers chained by megatron-core's ``MimoOptimizer``, plus one
``OptimizerParamScheduler`` per branch (each branch may have its own learning rate).

megatron-core's ``get_mimo_optimizer`` gives every branch the same ``OptimizerConfig``; we build
the per-branch optimizers ourselves (same calls) so each branch gets its own LR, then hand them
to the stock ``MimoOptimizer``, which agrees found-inf (MAX), per-branch grad-norm^2 (MAX, then
sum) and success (MIN) over the whole world, in the same order on every rank. Its hard-coded
CUDA-only tensors are handled on the CPU by :mod:`megatron_mimo.compat.cpu`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.mimo import MimoModel
from megatron.core.models.mimo.optimizer import MimoOptimizer, ModuleOptimizerInfo
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mimo.config.layout import BRANCHES
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.models.mimo import branch_module


def mcore_optimizer_config(cfg: MimoConfig, branch: str) -> McoreOptimizerConfig:
    """megatron-core OptimizerConfig of one branch (AdamW, fp32, distributed optimizer)."""
    lr, min_lr = cfg.optimizer.branch_lr(branch)
    opt = cfg.optimizer
    return McoreOptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, use_distributed_optimizer=True, params_dtype=torch.float32,
        bf16=False, fp16=False,
    )


def build_mimo_optimizer(cfg: MimoConfig, model: MimoModel, topology: Topology) -> MimoOptimizer:
    """One DistributedOptimizer for this rank's branch, chained with the other branch's stub."""
    infos: dict[str, ModuleOptimizerInfo] = {}
    for branch in BRANCHES:
        active = topology.in_branch(branch)
        optimizer = None
        if active:
            optimizer = get_megatron_optimizer(
                config=mcore_optimizer_config(cfg, branch),
                model_chunks=[branch_module(model, branch)],
                pg_collection=topology.pgs(branch),
                use_gloo_process_groups=False,
            )
        infos[branch] = ModuleOptimizerInfo(
            optimizer=optimizer, grid=topology.grid(branch),
            pg_collection=topology.pgs(branch) if active else None, is_active=active)
    return MimoOptimizer(infos, mcore_optimizer_config(cfg, topology.my_branch))


def build_scheduler(cfg: MimoConfig, optimizer, branch: str) -> OptimizerParamScheduler:
    """Warmup + decay in iterations for one branch's optimizer."""
    lr, min_lr = cfg.optimizer.branch_lr(branch)
    decay_iters = cfg.scheduler.lr_decay_iters or cfg.training.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=cfg.scheduler.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, cfg.scheduler.lr_warmup_iters + 1),
        lr_decay_style=cfg.scheduler.lr_decay_style,
        start_wd=cfg.optimizer.weight_decay, end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=decay_iters, wd_incr_style="constant",
    )


@dataclass
class BranchSchedulers:
    """One scheduler per branch; only this rank's branch is real, the others are computed
    (pure functions of the iteration) so every rank can log every branch's LR."""

    schedulers: dict[str, OptimizerParamScheduler]

    def step(self) -> None:
        """Advance every branch by one iteration (call only after a successful step)."""
        for scheduler in self.schedulers.values():
            scheduler.step(increment=1)

    def lrs(self) -> dict[str, float]:
        """Current learning rate per branch."""
        return {name: s.get_lr(s.optimizer.param_groups[0]) for name, s in self.schedulers.items()}

    @property
    def num_steps(self) -> int:
        """Iterations the schedulers have advanced (same for every branch)."""
        return next(iter(self.schedulers.values())).num_steps


class _LrHolder:
    """Optimizer stand-in for a branch this rank does not own: one param group, no params."""

    def __init__(self) -> None:
        self.param_groups = [{"params": [], "lr": 0.0, "weight_decay": 0.0}]


def build_schedulers(cfg: MimoConfig, optimizer: MimoOptimizer, topology: Topology) -> BranchSchedulers:
    """Schedulers for all branches: the real optimizer for this rank's branch."""
    schedulers = {}
    for branch in BRANCHES:
        info = optimizer.module_infos[branch]
        target = info.optimizer if info.is_active else _LrHolder()
        schedulers[branch] = build_scheduler(cfg, target, branch)
    return BranchSchedulers(schedulers)
