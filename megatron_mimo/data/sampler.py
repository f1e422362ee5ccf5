"""Which samples each data-parallel rank of a branch reads, and the position a checkpoint keeps.

One micro-step consumes ``job_micro_batch`` consecutive sample indices; DP rank ``r`` of a
branch with DP size ``D`` takes the ``r``-th of ``D`` equal slices. The bridge concatenates
images DP slices in DP order, so both branches see the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_mimo.errors import DataError


@dataclass(frozen=True)
class BranchSampler:
    """Which sample indices one DP rank of one branch reads at each micro-step.

    Pure arithmetic on (consumed samples, micro-step): resuming at any consumed-samples
    offset reproduces exactly the indices of the uninterrupted run.
    """

    job_micro_batch: int
    dp_size: int
    dp_rank: int

    def __post_init__(self) -> None:
        if self.job_micro_batch % self.dp_size:
            raise DataError(f"micro-batch {self.job_micro_batch} does not split over dp {self.dp_size}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise DataError(f"dp_rank {self.dp_rank} outside dp size {self.dp_size}")

    @property
    def per_rank(self) -> int:
        """Samples this rank reads per micro-step."""
        return self.job_micro_batch // self.dp_size

    def indices(self, consumed_samples: int, micro_step: int, base: int = 0) -> list[int]:
        """Global sample indices of this rank for ``micro_step`` after ``consumed_samples``."""
        start = base + consumed_samples + micro_step * self.job_micro_batch + self.dp_rank * self.per_rank
        return list(range(start, start + self.per_rank))


@dataclass
class DataPosition:
    """How many samples this branch has consumed: the data piece of a checkpoint.

    The mock sampler is pure arithmetic on this count; a real loader keeps its own state here.
    """

    consumed_samples: int = 0

    def advance(self, samples: int) -> None:
        """Account one iteration's global batch."""
        self.consumed_samples += samples

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (checkpoints load with ``weights_only=True``)."""
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position."""
        self.consumed_samples = int(state["consumed_samples"])
