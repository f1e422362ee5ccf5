"""Training precision (Megatron's flags): fp32 by default; --bf16 or --fp16 train the model in 16
bits while each branch's DistributedOptimizer keeps fp32 main parameters (and, for fp16, a grad
scaler). No torch import here."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mimo.errors import require

FP16_DEFAULTS = {"initial_loss_scale": 2.0 ** 32, "min_loss_scale": 1.0, "loss_scale_window": 1000,
                 "hysteresis": 2}
"""Megatron's defaults for the dynamic fp16 loss scaler."""


@dataclass(frozen=True)
class PrecisionConfig:
    """Model and gradient precision, and the fp16 loss scaler."""

    bf16: bool = False
    """Train the model in bfloat16 (fp32 main parameters and Adam moments in the optimizer)."""
    fp16: bool = False
    """Train the model in float16 with loss scaling (fp32 main parameters in the optimizer)."""
    accumulate_allreduce_grads_in_fp32: bool = False
    """Accumulate and all-reduce gradients in fp32 (always on with --bf16, as in Megatron)."""
    loss_scale: float | None = None
    """Static loss scale for --fp16 (a power of 2); unset: dynamic loss scaling."""
    initial_loss_scale: float | None = None
    """Initial dynamic loss scale for --fp16 (default 2**32)."""
    min_loss_scale: float | None = None
    """Smallest dynamic loss scale for --fp16 (default 1)."""
    loss_scale_window: int | None = None
    """Iterations without overflow before the dynamic --fp16 scale doubles (default 1000)."""
    hysteresis: int | None = None
    """Overflowing iterations tolerated before the dynamic --fp16 scale halves (default 2)."""

    def __post_init__(self) -> None:
        require(not (self.bf16 and self.fp16), "--bf16 and --fp16 exclude each other; pick one")
        given = [name for name in ("loss_scale", *FP16_DEFAULTS) if getattr(self, name) is not None]
        require(self.fp16 or not given,
                f"--{given[0].replace('_', '-') if given else ''} applies to --fp16 only; add "
                f"--fp16 or drop it")
        for name in given:
            require(getattr(self, name) > 0,
                    f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

    @property
    def name(self) -> str:
        """'fp32', 'bf16' or 'fp16': the dtype of the model's weights and activations."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def grads_in_fp32(self) -> bool:
        """Whether DDP keeps and reduces gradients in fp32."""
        return self.accumulate_allreduce_grads_in_fp32 or self.bf16 or not self.fp16

    def scaler(self) -> dict[str, float | int | None]:
        """Loss-scaler settings with Megatron's defaults filled in (fp16 only)."""
        settings: dict[str, float | int | None] = {"loss_scale": self.loss_scale}
        for name, default in FP16_DEFAULTS.items():
            value = getattr(self, name)
            settings[name] = default if value is None else value
        return settings
