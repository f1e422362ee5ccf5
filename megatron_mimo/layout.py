"""Rank arithmetic of a heterogeneous layout, in pure Python (no torch).

A layout is a list of :class:`BranchSpec`; each branch owns the contiguous global ranks
``[rank_offset, rank_offset + tp*dp*pp)``. The branches must tile ``[0, world_size)`` exactly.
Colocated layouts (two branches on the same ranks) are rejected: megatron-core's
non-colocated ``MimoModel`` builds one branch per rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_mimo.errors import ConfigError

GRID_DIMS = ("tp", "cp", "dp", "pp")
"""Dimension order of every branch grid (Megatron's default 'tp-cp-ep-dp-pp' without ep)."""


@dataclass(frozen=True)
class BranchSpec:
    """One branch of the job: its name, its parallel sizes and its first global rank."""

    name: str
    tp: int = 1
    dp: int = 1
    pp: int = 1
    rank_offset: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a branch needs a non-empty name")
        for dim in ("tp", "dp", "pp"):
            value = getattr(self, dim)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.name} branch: {dim} must be an integer >= 1, got {value!r}")
        if self.rank_offset < 0:
            raise ConfigError(f"{self.name} branch: rank_offset must be >= 0, got {self.rank_offset}")

    @property
    def num_ranks(self) -> int:
        """Ranks the branch occupies: tp * dp * pp."""
        return self.tp * self.dp * self.pp

    @property
    def ranks(self) -> range:
        """Global ranks of the branch."""
        return range(self.rank_offset, self.rank_offset + self.num_ranks)

    @property
    def grid_shape(self) -> list[int]:
        """Shape of the branch's HyperCommGrid over :data:`GRID_DIMS` (cp is always 1)."""
        return [self.tp, 1, self.dp, self.pp]

    def describe(self) -> str:
        """Short human form, e.g. 'language TP2xDP1xPP1 on ranks 2-3'."""
        last = self.rank_offset + self.num_ranks - 1
        return f"{self.name} TP{self.tp}xDP{self.dp}xPP{self.pp} on ranks {self.rank_offset}-{last}"


def check_layout(specs: Sequence[BranchSpec], world_size: int) -> None:
    """Raise ConfigError unless the branches tile ``[0, world_size)`` with no gap or overlap."""
    if not specs:
        raise ConfigError("a layout needs at least one branch")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"branch names must be unique, got {names}")
    for spec in specs:
        end = spec.rank_offset + spec.num_ranks
        if end > world_size:
            raise ConfigError(
                f"{spec.name} branch needs tp {spec.tp} x dp {spec.dp} x pp {spec.pp} = "
                f"{spec.num_ranks} ranks from rank {spec.rank_offset} (up to rank {end - 1}), "
                f"but the world has {world_size} ranks")
    ordered = sorted(specs, key=lambda s: s.rank_offset)
    expected_start = 0
    for spec in ordered:
        if spec.rank_offset < expected_start:
            previous = next(s for s in ordered if expected_start - 1 in s.ranks)
            raise ConfigError(
                f"branches overlap: {previous.describe()} and {spec.describe()} "
                f"(colocated layouts are not supported; start {spec.name} at rank {expected_start})")
        if spec.rank_offset > expected_start:
            raise ConfigError(
                f"ranks {expected_start}-{spec.rank_offset - 1} belong to no branch "
                f"(next is {spec.describe()}); branches must tile all {world_size} ranks")
        expected_start = spec.rank_offset + spec.num_ranks
    if expected_start != world_size:
        raise ConfigError(
            f"ranks {expected_start}-{world_size - 1} belong to no branch; the branches cover "
            f"{expected_start} of {world_size} ranks")


def check_batch_split(specs: Sequence[BranchSpec], global_batch_size: int,
                      job_micro_batch: int) -> None:
    """Raise ConfigError unless every micro-batch splits evenly over every branch's DP ranks.

    ``job_micro_batch`` is the number of samples one micro-step consumes job-wide (language
    micro-batch size x language DP). Each branch's DP rank takes ``job_micro_batch / dp`` of them.
    """
    if global_batch_size % job_micro_batch:
        raise ConfigError(
            f"global batch {global_batch_size} must divide by the job-wide micro-batch "
            f"{job_micro_batch} (micro_batch_size x language dp)")
    for spec in specs:
        if job_micro_batch % spec.dp:
            raise ConfigError(
                f"the job-wide micro-batch of {job_micro_batch} samples does not split over the "
                f"{spec.name} branch's dp {spec.dp}; choose --micro-batch-size so that "
                f"micro_batch_size x language dp is a multiple of {spec.dp}")


def branch_of(specs: Sequence[BranchSpec], global_rank: int) -> BranchSpec:
    """The branch that owns ``global_rank``."""
    for spec in specs:
        if global_rank in spec.ranks:
            return spec
    raise ValueError(f"rank {global_rank} belongs to no branch")
