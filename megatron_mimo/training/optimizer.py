"""Per-branch DistributedOptimizers chained by megatron-core's ``MimoOptimizer``, plus one
``OptimizerParamScheduler`` per branch (each branch may have its own learning rate).

megatron-core's ``get_mimo_optimizer`` gives every branch the same ``OptimizerConfig``; we build
the per-branch optimizers ourselves (same calls) so each branch gets its own LR, then hand them
to megatron-core's ``MimoOptimizer``, which agrees found-inf (MAX), per-branch grad-norm^2 (MAX,
then sum) and success (MIN) over the whole world, in the same order on every rank. In bf16/fp16
each DistributedOptimizer keeps fp32 main parameters; in fp16 every branch's loss scaler moves on
the world's found-inf verdict (workaround ``defer_scaler_updates``). Its hard-coded CUDA-only
tensors are handled on the CPU by :mod:`megatron_mimo.compat.cpu`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.mimo import MimoModel
from megatron.core.models.mimo.optimizer import MimoOptimizer, ModuleOptimizerInfo
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mimo.compat.mcore import (
    apply_unnested_grad_scaler,
    defer_scaler_updates,
    settle_scaler_updates,
)
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.models.common import TORCH_DTYPES
from megatron_mimo.models.mimo import branch_module


def mcore_optimizer_config(cfg: MimoConfig, branch: str) -> McoreOptimizerConfig:
    """megatron-core OptimizerConfig of one branch (AdamW, distributed optimizer, precision)."""
    lr, min_lr = cfg.optimizer.branch_lr(branch)
    opt, precision = cfg.optimizer, cfg.precision
    scaler = precision.scaler() if precision.fp16 else {}
    return McoreOptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, use_distributed_optimizer=True,
        params_dtype=TORCH_DTYPES[precision.name], bf16=precision.bf16, fp16=precision.fp16,
        **scaler,
    )


class MimoOptimizerWithWorkarounds(MimoOptimizer):
    """megatron-core's ``MimoOptimizer`` with two fp16 workarounds: every branch's loss scaler
    moves on the world's found-inf verdict (one more small all-reduce per step), and the grad
    scaler is checkpointed as one ShardedObject, not one wrapped in another."""

    def __init__(self, infos: dict[str, ModuleOptimizerInfo], config: McoreOptimizerConfig,
                 device: torch.device) -> None:
        super().__init__(infos, config)
        self.device = device
        self.deferred = defer_scaler_updates(self._active_optimizers)

    def prepare_grads(self) -> bool:
        """Unscale and check every branch's grads; settle the scalers on the world verdict."""
        return settle_scaler_updates(super().prepare_grads(), self.deferred, self.device)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        """megatron-core's per-branch sharded state, with the grad scaler unnested."""
        return apply_unnested_grad_scaler(
            super().sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs))


def build_mimo_optimizer(cfg: MimoConfig, model: MimoModel, topology: Topology,
                         device: torch.device) -> MimoOptimizer:
    """One DistributedOptimizer for this rank's branch (its trainable parameters only), chained
    with the other branches' stubs.

    A branch with nothing to train (``--freeze-vit --freeze-projection``, ``--freeze-lm``) has no
    optimizer: its ranks' MimoOptimizer is a stub that still joins every world all-reduce
    (found-inf, grad norm, where the branch adds 0, success). It still calls
    ``get_megatron_optimizer``, which agrees the param groups over the whole world (the other
    branch waits in that collective); that call returns no stub here but an optimizer over one
    empty param group, which cannot be checkpointed (torch Adam without state), so it is dropped.
    """
    infos: dict[str, ModuleOptimizerInfo] = {}
    for branch in cfg.branches:
        active = topology.in_branch(branch)
        optimizer = None
        if active:
            module = branch_module(model, branch)
            optimizer = get_megatron_optimizer(
                config=mcore_optimizer_config(cfg, branch),
                model_chunks=[module],
                pg_collection=topology.pgs(branch),
                use_gloo_process_groups=False,
            )
            if not any(p.requires_grad for p in module.parameters()):
                optimizer = None
        infos[branch] = ModuleOptimizerInfo(
            optimizer=optimizer, grid=topology.grid(branch),
            pg_collection=topology.pgs(branch) if active else None, is_active=active)
    return MimoOptimizerWithWorkarounds(infos, mcore_optimizer_config(cfg, topology.my_branch), device)


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
    """Optimizer stand-in for a branch this rank does not own, or one with nothing to train:
    one param group, no params."""

    def __init__(self) -> None:
        self.param_groups = [{"params": [], "lr": 0.0, "weight_decay": 0.0}]


def build_schedulers(cfg: MimoConfig, optimizer: MimoOptimizer, topology: Topology) -> BranchSchedulers:
    """Schedulers for all branches: the real optimizer for this rank's branch (if it trains)."""
    schedulers = {}
    for branch in cfg.branches:
        info = optimizer.module_infos[branch]
        target = info.optimizer if info.optimizer is not None else _LrHolder()
        schedulers[branch] = build_scheduler(cfg, target, branch)
    return BranchSchedulers(schedulers)
