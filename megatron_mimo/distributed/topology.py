"""Per-branch process groups on megatron-core's HyperCommGrid, without global parallel_state.

:func:`build_topology` is collective over the world: every rank creates every branch's groups
in the same order (process-group creation is a WORLD collective), and keeps the
:class:`~megatron.core.process_groups_config.ProcessGroupCollection` of its own branch.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_mimo.config.layout import (
    GRID_DIMS,
    LANGUAGE,
    BranchSpec,
    ParallelismConfig,
    branch_of,
    check_layout,
)

EXPERT_VIEW = "expert"
"""View name megatron-core's ``get_mimo_optimizer`` reads expert groups from."""

DENSE_GROUP_DIMS: tuple[tuple[str, ...], ...] = (
    ("tp",), ("cp",), ("dp",), ("pp",),
    ("dp", "cp"), ("tp", "cp"), ("tp", "pp"), ("tp", "cp", "dp"), ("tp", "cp", "dp", "pp"),
)
"""Base-view groups each branch grid creates (all that DDP, optimizer and models read)."""

EXPERT_GROUP_DIMS: tuple[tuple[str, ...], ...] = (
    ("ep",), ("expt_tp",), ("expt_dp",), ("expt_tp", "ep"), ("expt_tp", "ep", "pp"),
)
"""Expert-view groups (dense models: ep=1, expt_tp=tp) that megatron-core's optimizer reads."""


@dataclass
class BranchTopology:
    """One branch's grid on every rank, and its process groups on the branch's own ranks."""

    spec: BranchSpec
    grid: HyperCommGrid
    pgs: ProcessGroupCollection | None
    """Process groups of this rank's branch; None on ranks outside the branch."""

    @property
    def is_member(self) -> bool:
        """Whether the current rank belongs to this branch."""
        return self.pgs is not None


@dataclass
class Topology:
    """All branches of the job as seen from one rank. Pass it around; never store it globally."""

    rank: int
    world_size: int
    branches: dict[str, BranchTopology] = field(default_factory=dict)

    @property
    def my_branch(self) -> str:
        """Name of the branch this rank belongs to."""
        return branch_of([b.spec for b in self.branches.values()], self.rank).name

    def in_branch(self, name: str) -> bool:
        """Whether this rank belongs to branch ``name``."""
        return self.branches[name].is_member

    def pgs(self, name: str | None = None) -> ProcessGroupCollection:
        """Process groups of branch ``name`` (default: this rank's branch); member ranks only."""
        branch = self.branches[name or self.my_branch]
        if branch.pgs is None:
            raise ValueError(f"rank {self.rank} is not in the {branch.spec.describe()}")
        return branch.pgs

    def grid(self, name: str) -> HyperCommGrid:
        """HyperCommGrid of branch ``name`` (exists on every rank)."""
        return self.branches[name].grid

    def spec(self, name: str) -> BranchSpec:
        """Layout of branch ``name``."""
        return self.branches[name].spec

    def dp_rank(self, name: str | None = None) -> int:
        """DP rank of this rank within its branch."""
        return self.pgs(name).dp.rank()

    def tp_rank(self, name: str | None = None) -> int:
        """TP rank of this rank within its branch."""
        return self.pgs(name).tp.rank()

    def describe(self) -> str:
        """One line per branch; marks this rank's branch."""
        return "; ".join(
            ("*" if b.is_member else "") + b.spec.describe() for b in self.branches.values())

    def destroy(self) -> None:
        """Destroy every process group this topology created (call on every rank)."""
        for branch in self.branches.values():
            branch.grid.destroy()
            if branch.pgs is not None:
                for name in ("embd", "pos_embd"):
                    group = getattr(branch.pgs, name, None)
                    if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
                        dist.destroy_process_group(group)
        self.branches.clear()


def _build_grid(spec: BranchSpec, backend: str | None,
                timeout: datetime.timedelta | None) -> HyperCommGrid:
    grid = HyperCommGrid(spec.grid_shape, list(GRID_DIMS), rank_offset=spec.rank_offset,
                         backend=backend)
    grid.register_view(EXPERT_VIEW, shape=[spec.tp, 1, spec.dp, spec.pp],
                       dim_names=["expt_tp", "ep", "expt_dp", "pp"], shared_dims=["pp"])
    kwargs = {"timeout": timeout} if timeout is not None else {}
    for dims in DENSE_GROUP_DIMS:
        grid.create_pg(list(dims), **kwargs)
    for dims in EXPERT_GROUP_DIMS:
        grid.create_pg(list(dims), view=EXPERT_VIEW, **kwargs)
    return grid


def _embedding_groups(grid: HyperCommGrid, backend: str | None):
    """Word-embedding group (first + last PP stage) and position-embedding group (first stage).

    Built from the grid's PP enumeration with ``new_subgroups_by_enumeration`` so every rank
    takes part in every creation (a WORLD collective).
    """
    pp_groups = grid.get_rank_enum("pp")
    embd_ranks = [sorted({g[0], g[-1]}) for g in pp_groups]
    pos_ranks = [[g[0]] for g in pp_groups]
    embd, _ = dist.new_subgroups_by_enumeration(embd_ranks, backend=backend)
    pos_embd, _ = dist.new_subgroups_by_enumeration(pos_ranks, backend=backend)
    return embd, pos_embd


def _collection(grid: HyperCommGrid, embd, pos_embd) -> ProcessGroupCollection:
    """Fill every ProcessGroupCollection field that DDP, the optimizer and the models read."""
    pgs = ProcessGroupCollection()
    pgs.tp = grid.get_pg("tp")
    pgs.cp = grid.get_pg("cp")
    pgs.dp = grid.get_pg("dp")
    pgs.pp = grid.get_pg("pp")
    pgs.dp_cp = grid.get_pg(["dp", "cp"])
    pgs.tp_cp = grid.get_pg(["tp", "cp"])
    pgs.mp = grid.get_pg(["tp", "pp"])
    pgs.tp_dp_cp = grid.get_pg(["tp", "cp", "dp"])
    pgs.intra_dist_opt = grid.get_pg(["tp", "cp", "dp", "pp"])
    pgs.intra_dp_cp = pgs.dp_cp
    pgs.ep = grid.get_pg("ep", view=EXPERT_VIEW)
    pgs.expt_tp = grid.get_pg("expt_tp", view=EXPERT_VIEW)
    pgs.expt_dp = grid.get_pg("expt_dp", view=EXPERT_VIEW)
    pgs.intra_expt_dp = pgs.expt_dp
    pgs.tp_ep = grid.get_pg(["expt_tp", "ep"], view=EXPERT_VIEW)
    pgs.tp_ep_pp = grid.get_pg(["expt_tp", "ep", "pp"], view=EXPERT_VIEW)
    pgs.embd = embd
    pgs.pos_embd = pos_embd
    return pgs


def check_groups(topology: Topology, device: torch.device) -> None:
    """All-reduce a rank-tagged value in this rank's TP and DP groups and check the sums (a
    cheap start-up proof that every rank built the same groups)."""
    pgs = topology.pgs()
    for label, group in (("tp", pgs.tp), ("dp", pgs.dp)):
        value = torch.tensor([float(topology.rank)], device=device)
        dist.all_reduce(value, group=group)
        expected = float(sum(dist.get_process_group_ranks(group)))
        if value.item() != expected:
            raise RuntimeError(f"{label} all-reduce gave {value.item()}, expected {expected}")


def build_topology(specs: Sequence[BranchSpec], *, backend: str | None = None,
                   timeout: datetime.timedelta | None = None) -> Topology:
    """Create every branch's groups (collective over the world) and return this rank's view.

    Raises ConfigError (before any collective) when the branches do not tile the world.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_topology needs torch.distributed initialised (runtime.init_distributed)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    check_layout(specs, world_size)
    topology = Topology(rank=rank, world_size=world_size)
    for spec in specs:
        grid = _build_grid(spec, backend, timeout)
        embd, pos_embd = _embedding_groups(grid, backend)
        member = rank in spec.ranks
        pgs = _collection(grid, embd, pos_embd) if member else None
        topology.branches[spec.name] = BranchTopology(spec=spec, grid=grid, pgs=pgs)
    return topology


def single_rank_groups(backend: str | None = None) -> ProcessGroupCollection:
    """Every process group of a one-rank world (one process runs the whole model: conversion,
    generation). Collective over that world of one."""
    if dist.get_world_size() != 1:
        raise RuntimeError(f"single_rank_groups needs a world of 1 rank, not {dist.get_world_size()}")
    grid = _build_grid(ParallelismConfig().spec(LANGUAGE), backend, None)
    return _collection(grid, *_embedding_groups(grid, backend))
