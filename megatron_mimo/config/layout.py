"""The layout: which global ranks each branch owns and how it splits them (pure Python, no torch).

"Layout" means this and only this: every branch owns the contiguous ranks
``[offset, offset + tp*dp*pp)``, and the branches tile ``[0, world_size)`` exactly. Colocated
layouts (two branches on the same ranks) are rejected: megatron-core's non-colocated
``MimoModel`` builds one branch per rank. It lives with the config (not in ``distributed/``)
because validating a config needs it and the config imports nothing above itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_mimo.errors import ConfigError, require, require_positive

IMAGES = "images"
AUDIO = "audio"
LANGUAGE = "language"
BRANCHES = (IMAGES, LANGUAGE)
"""The branches every job has, in the order every rank builds their process groups."""
ALL_BRANCHES = (IMAGES, AUDIO, LANGUAGE)
"""Every branch a job may have (the audio branch is optional), in group-building order."""

GRID_DIMS = ("tp", "cp", "dp", "pp")
"""Dimension order of every branch grid (Megatron's default 'tp-cp-ep-dp-pp' without ep)."""


@dataclass(frozen=True)
class ParallelismConfig:
    """Where one branch lives and how it is split: ranks [offset, offset + tp*dp*pp)."""

    tp: int = 1
    """Tensor-parallel size of the branch."""
    dp: int = 1
    """Data-parallel size of the branch."""
    pp: int = 1
    """Pipeline-parallel size of the branch (the images branch must use 1)."""
    offset: int = 0
    """First global rank of the branch."""

    def __post_init__(self) -> None:
        require_positive("parallelism", tp=self.tp, dp=self.dp, pp=self.pp)
        require(isinstance(self.offset, int) and self.offset >= 0,
                f"parallelism.offset must be >= 0, got {self.offset}")

    def spec(self, name: str) -> BranchSpec:
        """This layout as the named branch ``name``."""
        return BranchSpec(name, self)


@dataclass(frozen=True)
class BranchSpec:
    """One branch of the job: its name and its :class:`ParallelismConfig`."""

    name: str
    parallel: ParallelismConfig

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a branch needs a non-empty name")

    @property
    def tp(self) -> int:
        """Tensor-parallel size."""
        return self.parallel.tp

    @property
    def dp(self) -> int:
        """Data-parallel size."""
        return self.parallel.dp

    @property
    def pp(self) -> int:
        """Pipeline-parallel size."""
        return self.parallel.pp

    @property
    def rank_offset(self) -> int:
        """First global rank."""
        return self.parallel.offset

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


def branch_spec(name: str, tp: int = 1, dp: int = 1, pp: int = 1, offset: int = 0) -> BranchSpec:
    """Shorthand for ``ParallelismConfig(tp, dp, pp, offset).spec(name)``."""
    return ParallelismConfig(tp=tp, dp=dp, pp=pp, offset=offset).spec(name)


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
            f"--global-batch-size {global_batch_size} must divide by the job-wide micro-batch "
            f"{job_micro_batch} (--micro-batch-size x --llm-dp)")
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
    raise ConfigError(f"rank {global_rank} belongs to no branch")
