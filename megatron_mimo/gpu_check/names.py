"""Pure helpers of the GPU check: what a check needs, its result line, the parameter names of the
Transformer Engine build, the weight copy between builds and the error measure. torch is imported
where it is used: the command imports this module before it sends all output to its log."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

GPU, TWO_GPUS, TE, MAMBA_SSM = "gpu", "two_gpus", "transformer_engine", "mamba_ssm"
"""What a check can need: a GPU, two GPUs, transformer-engine, mamba-ssm."""

TWO_GPUS_REASON = "needs 2 GPUs (the branches run on 2 ranks and NCCL puts one rank per GPU)"


@dataclass(frozen=True)
class Result:
    """The outcome of one check: its one output line."""

    status: str
    name: str
    reason: str

    def line(self) -> str:
        """``STATUS name: reason`` on one line."""
        return f"{self.status} {self.name}: {' '.join(self.reason.split())}"


@dataclass(frozen=True)
class Environment:
    """What this machine offers the checks."""

    gpus: int
    transformer_engine: bool
    mamba_ssm: bool


def skip_reason(needs: frozenset[str], env: Environment) -> str | None:
    """Why a check with ``needs`` cannot run here (None: it can). No GPU skips everything."""
    if env.gpus == 0:
        return "no GPU"
    if TE in needs and not env.transformer_engine:
        return "no transformer-engine"
    if MAMBA_SSM in needs and not env.mamba_ssm:
        return "no mamba-ssm"
    if TWO_GPUS in needs and env.gpus < 2:
        return TWO_GPUS_REASON
    return None


TE_FUSED_NORMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.*\blayers\.\d+\.)input_layernorm\.(weight|bias)$"),
     r"\1self_attention.linear_qkv.layer_norm_\2"),
    (re.compile(r"^(.*\blayers\.\d+\.)pre_mlp_layernorm\.(weight|bias)$"),
     r"\1mlp.linear_fc1.layer_norm_\2"),
    (re.compile(r"^(.*\blayers\.\d+\.)norm\.(weight|bias)$"),
     r"\1mixer.in_proj.layer_norm_\2"),
)
"""Local norm parameter -> the TE parameter that holds it. The TE layer specs (GPT, ViT, the
hybrid's attention, MLP and Mamba layers) have no separate norms: the norm before attention lives
in ``linear_qkv``, the one before the MLP in ``linear_fc1``, a Mamba layer's in ``mixer.in_proj``
(``TELayerNormColumnParallelLinear``: ``layer_norm_weight``, ``layer_norm_bias``). The same moves
as the ``sharded_state_dict_keys_map`` of megatron-core's local GPT spec and of the local hybrid
spec; a Mamba mixer's own gated norm (``mixer.norm``) stays where it is."""


def te_name(local_name: str) -> str:
    """Name in the TE build of the local build's parameter ``local_name``."""
    for pattern, replacement in TE_FUSED_NORMS:
        if pattern.match(local_name):
            return pattern.sub(replacement, local_name)
    return local_name


def same_name(name: str) -> str:
    """Identity renaming (both builds use the same spec)."""
    return name


class NameMismatch(ValueError):
    """The two builds' parameters do not pair up one to one."""


def _listed(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def copy_parameters(src: torch.nn.Module, dst: torch.nn.Module,
                    rename: Callable[[str], str]) -> int:
    """Copy every parameter of ``src`` into the ``dst`` parameter named ``rename(name)``; every
    ``dst`` parameter must receive exactly one, of its shape. Returns the number copied."""
    import torch

    by_dst_name: dict[str, torch.nn.Parameter] = {}
    for name, param in src.named_parameters():
        target = rename(name)
        if target in by_dst_name:
            raise NameMismatch(f"two source parameters map to {target}")
        by_dst_name[target] = param
    dst_params = dict(dst.named_parameters())
    missing, extra = set(dst_params) - set(by_dst_name), set(by_dst_name) - set(dst_params)
    if missing or extra:
        raise NameMismatch(f"no source for {_listed(missing) or '-'}; no target for "
                           f"{_listed(extra) or '-'}")
    with torch.no_grad():
        for name, param in dst_params.items():
            source = by_dst_name[name]
            if source.shape != param.shape:
                raise NameMismatch(f"{name}: shape {tuple(source.shape)} vs {tuple(param.shape)}")
            param.copy_(source.to(param.device, param.dtype))
    return len(dst_params)


def perturb_parameters(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add seeded noise to every parameter: norms start at exactly 1 and 0, so a norm copied into
    the wrong place, or not copied, would otherwise not change the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.add_(scale * noise.to(param.device, param.dtype))


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` in float64 (inf on a shape mismatch or a
    non-finite value)."""
    if candidate.shape != reference.shape:
        return math.inf
    c, r = candidate.detach().double().cpu(), reference.detach().double().cpu()
    error = (c - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
    return error if math.isfinite(error) else math.inf


def within(name: str, error: float, tolerance: float, what: str) -> Result:
    """PASS when ``error <= tolerance``, with both numbers in the line."""
    status = PASS if error <= tolerance else FAIL
    sign = "<=" if status == PASS else ">"
    return Result(status, name, f"max|diff|/max|ref| {error:.2e} {sign} {tolerance:.0e} ({what})")
