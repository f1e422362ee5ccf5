"""What a checkpoint holds, as one sharded state dict under fixed keys, and how it is restored.

    model         both branches' weights (MimoModel keys: unique per branch)
    optimizer     MimoOptimizer state, 'mimo.<branch>.'-prefixed; param_groups, grad scaler and
                  param_state_sharding_type as ShardedObjects with the branch's (tp, pp, dp)
    scheduler     one OptimizerParamScheduler state per branch
    data          consumed samples per branch (the sampler's position)
    events        per-branch skip history: always present (empty when idle), so the sharded
                  structure is the same in every save (a cached save plan never drops it)
    rng           python, numpy, torch CPU, CUDA, tracker streams, one object per global rank
    train_state   iteration, consumed samples/tokens, skipped iterations (world-wide, common)
    config        the full config (common)
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import random as mcore_random

from megatron_mimo.config import BRANCHES


def replica_id(pgs) -> tuple[int, int, int]:
    """(tp, pp, dp) rank in the branch: only (0, 0, 0) writes a per-branch object."""
    return (pgs.tp.rank(), pgs.pp.rank(), pgs.dp.rank())


def branch_object(key: str, data: Any, pgs, foreign: bool = False) -> ShardedObject:
    """One object per branch, written by the branch's first rank, read by all its ranks.

    ``foreign``: another branch's object this rank only reads (never a main replica)."""
    rid = replica_id(pgs)
    return ShardedObject(key, data, (1,), (0,), replica_id=(1, *rid) if foreign else rid)


def rank_object(key: str, data: Any, local_rank: int, branch_size: int) -> ShardedObject:
    """One object per rank of a branch (e.g. RNG): shard ``local_rank`` of ``branch_size``."""
    return ShardedObject(key, data, (branch_size,), (local_rank,), replica_id=0)


def capture_rng() -> dict[str, Any]:
    """Every random stream of this process, in checkpoint-safe types (tensors, ints, tuples)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch_cpu": torch.get_rng_state(),
        "tracker": mcore_random.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; call after every seeding step of start-up."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mcore_random.get_cuda_rng_tracker().set_states(
        {name: value.clone() for name, value in state["tracker"].items()})


def ensure_adam_state(optimizer) -> None:
    """Give every parameter of a never-stepped torch Adam zero moments and its own step.

    DistributedOptimizer's torch fallback cannot build a state dict (or a load template) before
    the first step: ``optimizer/distrib_optimizer.py:842`` asserts exactly one step value and
    ``:1223`` reads ``state['step']``. Zeros are what Adam would start from anyway.
    """
    inner = optimizer.optimizer
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return  # TE/apex optimizers keep step in the param groups and build state themselves
    for group in inner.param_groups:
        for param in group["params"]:
            if param not in inner.state or not inner.state[param]:
                inner.state[param] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}


def rebuild_adam_steps(optimizer) -> None:
    """Give every parameter its own ``step`` tensor, equal to its loaded param group's step.

    megatron-core 0.19.2 ``optimizer/distrib_optimizer.py:1049-1051`` assigns one shared tensor
    to every parameter (after one more step it reads N+P), and the dp_reshardable path copies
    the pre-load step back over it; both silently change Adam's bias correction.
    """
    inner = optimizer.optimizer
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return  # only torch's Adam keeps a per-parameter step tensor
    for group in inner.param_groups:
        if "step" not in group:
            continue
        for param in group["params"]:
            if param in inner.state:
                inner.state[param]["step"] = torch.tensor(float(group["step"]))


def inner_optimizers(mimo_optimizer) -> list:
    """The DistributedOptimizers of this rank's branch (a ChainedOptimizer is unrolled)."""
    result = []
    for info in mimo_optimizer.module_infos.values():
        if info.is_active and info.optimizer is not None:
            result += list(getattr(info.optimizer, "chained_optimizers", [info.optimizer]))
    return result


def scheduler_keys() -> list[str]:
    """ShardedObject key of each branch's scheduler."""
    return [f"scheduler.{branch}" for branch in BRANCHES]
