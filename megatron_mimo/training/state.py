"""Progress of a run and what one iteration reports: the train state a checkpoint keeps, the
sums of a global batch, the world-agreed result of a step, and the metrics record every sink
receives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

FLOPS_PER_PARAMETER_TOKEN = 6.0
"""Training FLOPs per parameter per token (forward + backward), the usual estimate."""


@dataclass(frozen=True)
class BatchSums:
    """What the last language stage reports for a global batch, summed over its micro-batches
    (over the world after the step's one all-reduce). The field order is the column order of the
    tensor that all-reduce sums: the one place that order is written down."""

    loss_sum: float = 0.0
    """Per-token loss summed over the loss tokens."""
    num_tokens: float = 0.0
    """Loss tokens (the sum of the loss mask)."""
    correct: float = 0.0
    """Evaluation only: samples whose answer word is the argmax of the logits."""
    answers: float = 0.0
    """Evaluation only: samples asked."""
    audio_correct: float = 0.0
    """Evaluation only, with an audio branch: samples whose second answer (the clip's) is the
    argmax of the logits."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Field names in column order (the keys the loss function reports)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def column(cls, name: str) -> int:
        """Column of ``name`` in :meth:`to_tensor` (ValueError for a name that is no field)."""
        return cls.names().index(name)

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The sums as one fp32 tensor (a column per field), for accumulating and all-reducing."""
        return torch.tensor(dataclasses.astuple(self), dtype=torch.float32, device=device)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> BatchSums:
        """Read back :meth:`to_tensor`'s layout (one host synchronisation)."""
        return cls(*tensor.tolist())

    def __add__(self, other: BatchSums) -> BatchSums:
        return BatchSums(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                  dataclasses.astuple(other), strict=True)))


@dataclass
class StepResult:
    """World-agreed outcome of one iteration (identical on every rank)."""

    loss: float
    num_tokens: int
    grad_norm: float | None
    skipped: bool
    loss_scale: float = 1.0
    """The loss scale after this step (fp16; 1.0 otherwise), identical on every rank."""
    phase_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    """World-agreed outcome of one evaluation (identical on every rank)."""

    loss: float
    """Mean per-token loss over the held-out batches."""
    accuracy: float
    """Share of held-out samples whose answer word (the caption's last word; for mock samples
    the first text token) is the argmax of the logits."""
    audio_accuracy: float | None = None
    """With an audio branch: the same share for the clip's answer word."""


@dataclass
class TrainState:
    """Progress of the run; with model, optimizer, schedulers, data and RNG, all a resume needs."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    floating_point_operations: float = 0.0
    """Training FLOPs so far, estimated as 6 x parameters x loss tokens (both branches)."""
    skipped_iterations: int = 0
    skipped_at: list[int] = field(default_factory=list)
    """Iterations whose step the world agreed to skip (found inf/nan); saved by :class:`SkipHistory`."""
    stopped_early: bool = field(default=False, compare=False)
    """Set when a signal or the time budget ended the run (not saved in checkpoints)."""

    def advance(self, result: StepResult, global_batch_size: int, num_parameters: int) -> None:
        """Account one finished iteration (data is consumed even when the step was skipped)."""
        if num_parameters <= 0:
            raise ValueError(f"num_parameters must be > 0 (got {num_parameters}): FLOPs would be 0")
        self.iteration += 1
        self.consumed_samples += global_batch_size
        self.consumed_tokens += result.num_tokens
        self.floating_point_operations += FLOPS_PER_PARAMETER_TOKEN * num_parameters * result.num_tokens
        self.skipped_iterations += int(result.skipped)
        if result.skipped:
            self.skipped_at.append(self.iteration)

    def state_dict(self) -> dict[str, Any]:
        """World-wide progress (saved once, as common state)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("skipped_at", "stopped_early")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from saved progress."""
        for name, value in state.items():
            setattr(self, name, value)


class SkipHistory:
    """The skip history of a :class:`TrainState` as a per-branch checkpoint piece.

    It is saved in every checkpoint, empty while nothing was skipped, so the sharded structure
    is the same in every save (a cached save plan never drops it)."""

    def __init__(self, state: TrainState) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        """Iterations skipped so far."""
        return {"skipped_at": list(self.state.skipped_at)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the skipped iterations."""
        self.state.skipped_at = list(state["skipped_at"])


def iteration_record(state: TrainState, result: StepResult, lrs: dict[str, float],
                     elapsed_s: float) -> dict[str, Any]:
    """What one iteration reports (identical on every rank; bit-exact floats in JSON)."""
    return {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
            "loss": result.loss, "grad_norm": result.grad_norm, "lr": lrs,
            "num_tokens": result.num_tokens, "skipped": result.skipped,
            "loss_scale": result.loss_scale,
            "skipped_iterations": state.skipped_iterations,
            "consumed_tokens": state.consumed_tokens,
            "floating_point_operations": state.floating_point_operations,
            "ms_per_iteration": elapsed_s * 1e3,
            "tokens_per_s": result.num_tokens / max(elapsed_s, 1e-9)}
