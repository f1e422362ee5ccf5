"""4-rank gloo world: build two layouts in turn, all-reduce in every branch's TP and DP group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_mimo.config.layout import branch_spec
from megatron_mimo.distributed.runtime import model_parallel_state_is_untouched
from megatron_mimo.distributed.topology import build_topology
from tests.workers.common import worker_main

LAYOUTS = {
    "images_tp1dp2_language_tp2dp1": [branch_spec("images", tp=1, dp=2, offset=0),
                              branch_spec("language", tp=2, dp=1, offset=2)],
    "images_tp2dp1_language_tp1dp2": [branch_spec("images", tp=2, dp=1, offset=0),
                              branch_spec("language", tp=1, dp=2, offset=2)],
}


@dataclass
class Reduced:
    """An all-reduce of (global rank + 1) over one group: the sum and the group's ranks."""

    sum: float
    ranks: list[int]


@dataclass
class Groups:
    """This rank's place and process groups under one layout."""

    branch: str
    in_images: bool
    dp_rank: int
    tp_rank: int
    tp: Reduced
    dp: Reduced
    pp_size: int
    mp_size: int
    intra_dist_opt: list[int]
    """Ranks of the distributed optimizer's group."""


@dataclass
class Topologies:
    """Every layout of :data:`LAYOUTS` built in turn on this rank."""

    layouts: dict[str, Groups]
    parallel_state_untouched: bool


def _reduce_ranks(group) -> Reduced:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value, group=group)
    return Reduced(sum=value.item(), ranks=dist.get_process_group_ranks(group))


def body(args: dict[str, Any]) -> Topologies:
    layouts = {}
    for name, specs in LAYOUTS.items():
        topo = build_topology(specs)
        pgs = topo.pgs()
        layouts[name] = Groups(
            branch=topo.my_branch, in_images=topo.in_branch("images"),
            dp_rank=topo.dp_rank(), tp_rank=topo.tp_rank(),
            tp=_reduce_ranks(pgs.tp), dp=_reduce_ranks(pgs.dp),
            pp_size=pgs.pp.size(), mp_size=pgs.mp.size(),
            intra_dist_opt=dist.get_process_group_ranks(pgs.intra_dist_opt))
        topo.destroy()
    return Topologies(layouts=layouts, parallel_state_untouched=model_parallel_state_is_untouched())


if __name__ == "__main__":
    worker_main(body)
