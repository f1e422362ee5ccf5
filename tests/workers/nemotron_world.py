"""Nemotron-style branches (RADIO + Mamba hybrid) at encoder TP2 and language TP2, with every
parallel_state getter made to raise: build, train, sharded_state_dict, save -> load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from tests.workers.common import forbid_parallel_state_groups, worker_main

LAYOUT = {"images_parallel.tp": 2, "images_parallel.dp": 1, "language_parallel.tp": 2,
          "language_parallel.dp": 1, "training.train_iters": 2}


@dataclass
class Sharding:
    """The ShardedTensors of this rank's sharded state dict."""

    num_tensors: int
    num_split: int
    """How many are split (local shape != global shape)."""
    fragments_per_split_key: dict[str, int]


@dataclass
class Shard:
    """A ShardedTensor a rank holds as main replica (every replica id 0)."""

    key: str
    offset: list[int]
    """Its global offset."""


@dataclass
class RankShards:
    """One rank's branch and main shards."""

    branch: str
    shards: list[Shard]


@dataclass
class BranchesRun:
    """Two steps, a save, a load into a fresh job, on one rank."""

    branch: str
    losses: list[float]
    grads_seen: bool
    """Every parameter of this rank's branch got a main_grad."""
    sharding: Sharding
    main_shards_by_rank: list[RankShards]
    """Every rank's main shards, gathered (in global rank order)."""
    round_trip_bitwise: bool
    num_params: int
    eval: float
    """Held-out loss after the load."""
    local_parameters: int


def _sharding_report(sharded: dict) -> tuple[Sharding, list[tuple[str, tuple[int, ...]]]]:
    """This rank's sharding, and its main shards as (key, global offset)."""
    tensors = []
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensorFactory):
            value = value.data if isinstance(value.data, ShardedTensor) else None
        if isinstance(value, ShardedTensor):
            tensors.append(value)
    main = sorted((t.key, tuple(t.global_offset)) for t in tensors
                  if not any(r != 0 for r in (t.replica_id if isinstance(t.replica_id, tuple)
                                              else (t.replica_id,))))
    split = [t for t in tensors if tuple(t.local_shape) != tuple(t.global_shape)]
    return Sharding(num_tensors=len(tensors), num_split=len(split), fragments_per_split_key={
        t.key: int(torch.tensor(t.axis_fragmentations).prod()) for t in split}), main


def body(args: dict[str, Any]) -> BranchesRun:
    from megatron_mimo.config.cli import apply_overrides
    from megatron_mimo.config.presets import tiny_cpu_nemotron
    from tests.workers.ckpt_world import Run

    forbid_parallel_state_groups()
    cfg = apply_overrides(tiny_cpu_nemotron(), {**LAYOUT, "checkpoint.save": args["root"],
                                                "checkpoint.load": args["root"]})
    run = Run(cfg)
    losses = [run.step()["loss"] for _ in range(2)]
    grads_seen = all(p.main_grad is not None for p in run.job.branch_ddp.parameters())
    sharding, main_shards = _sharding_report(run.job.model.sharded_state_dict())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (run.job.branch, main_shards))
    run.save()
    saved = {n: p.detach().clone() for n, p in run.job.model.named_parameters()}
    run.close()
    again = Run(cfg)
    again.load()
    same = all(torch.equal(saved[n], p) for n, p in again.job.model.named_parameters())
    out = BranchesRun(
        branch=again.job.branch, losses=losses, grads_seen=grads_seen, sharding=sharding,
        main_shards_by_rank=[RankShards(branch, [Shard(key, list(offset)) for key, offset in shards])
                             for branch, shards in gathered],
        round_trip_bitwise=same, num_params=len(saved), eval=again.eval_loss(),
        local_parameters=sum(p.numel() for p in again.job.branch_ddp.parameters()))
    again.close()
    return out


if __name__ == "__main__":
    worker_main(body)
