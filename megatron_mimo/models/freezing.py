"""Freeze parts of the model for staged (LLaVA-style) training: ``--freeze-vit``,
``--freeze-projection``, ``--freeze-lm`` (and ``--freeze-audio``: the whole audio branch).

Freezing is ``requires_grad=False``, set before DDP wrapping: DDP then gives those parameters no
gradient buffer and megatron-core's optimizer never sees them (a branch left with none gets
megatron-core's stub optimizer). Activations are not detached, so a frozen language model still
carries the gradient back to the projector. Frozen modules run in eval mode (no dropout), also
after an evaluation has put the model back into training mode (:func:`train_mode`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_mimo.config.layout import AUDIO, IMAGES, LANGUAGE
from megatron_mimo.config.schema import TrainingConfig

logger = logging.getLogger(__name__)

VIT, PROJECTION, LM, AUDIO_PART = "vit", "projection", "lm", "audio"

PARTS: dict[str, dict[str, str]] = {
    IMAGES: {VIT: "encoders", PROJECTION: "input_projections"},
    AUDIO: {AUDIO_PART: ""},
    LANGUAGE: {LM: ""},
}
"""The freezable parts of each branch module (unwrapped: before DDP), by submodule path
("" = the whole branch module)."""

FLAGS: dict[str, str] = {VIT: "freeze_vit", PROJECTION: "freeze_projection", LM: "freeze_lm",
                         AUDIO_PART: "freeze_audio"}
"""The :class:`TrainingConfig` field that freezes each part."""


@dataclass(frozen=True)
class PartCounts:
    """Parameters of one part of a branch, split by whether the optimizer trains them."""

    trainable: int = 0
    frozen: int = 0


def frozen_parts(training: TrainingConfig, branch: str) -> tuple[str, ...]:
    """The parts of ``branch`` the flags freeze."""
    return tuple(part for part in PARTS[branch] if getattr(training, FLAGS[part]))


def _part_of(branch: str, name: str) -> str:
    for part, path in PARTS[branch].items():
        if not path or name == path or name.startswith(path + "."):
            return part
    raise ValueError(f"{branch} branch: parameter {name!r} belongs to none of {sorted(PARTS[branch])}")


def _counted_here(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """A TP-sharded parameter counts on every TP rank, a replicated one on TP rank 0 only."""
    return getattr(param, "tensor_model_parallel", False) or tp_rank == 0


def parameter_counts(module: torch.nn.Module, branch: str, tp_rank: int = 0) -> dict[str, PartCounts]:
    """Trainable and frozen parameters per part of the unwrapped branch ``module`` on this rank
    (its TP shard and pipeline stage; replicated parameters count on TP rank 0 only)."""
    sums = {part: [0, 0] for part in PARTS[branch]}
    for name, param in module.named_parameters():
        if _counted_here(param, tp_rank):
            sums[_part_of(branch, name)][0 if param.requires_grad else 1] += param.numel()
    return {part: PartCounts(*values) for part, values in sums.items()}


def branch_parameter_counts(module: torch.nn.Module, branch: str, pgs: ProcessGroupCollection,
                            device: torch.device) -> dict[str, PartCounts]:
    """:func:`parameter_counts` of the whole branch: summed over its TP ranks and pipeline
    stages (collective over the branch's model-parallel group; every DP replica gets the same)."""
    local = parameter_counts(module, branch, pgs.tp.rank())
    flat = torch.tensor([[c.trainable, c.frozen] for c in local.values()], dtype=torch.int64,
                        device=device)
    dist.all_reduce(flat, group=pgs.mp)
    return {part: PartCounts(int(t), int(f)) for part, (t, f) in zip(local, flat.tolist(), strict=True)}


def freeze_branch(module: torch.nn.Module, branch: str, training: TrainingConfig) -> tuple[str, ...]:
    """Freeze the parts of the unwrapped branch ``module`` the flags name (call before DDP
    wrapping) and put them in eval mode; return the frozen parts."""
    parts = frozen_parts(training, branch)
    for part in parts:
        submodule = module.get_submodule(PARTS[branch][part])
        submodule.requires_grad_(False)
        submodule.eval()
    return parts


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, except that a module whose parameters are all frozen stays in eval
    mode (call it wherever the model goes back to training, e.g. after an evaluation)."""
    model.train()
    _eval_frozen(model)


def _eval_frozen(module: torch.nn.Module) -> None:
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _eval_frozen(child)


def format_counts(branch: str, counts: dict[str, PartCounts]) -> str:
    """One log line: trainable and frozen parameters per part of ``branch``."""
    parts = "; ".join(f"{part} {c.trainable:,} trainable, {c.frozen:,} frozen"
                      for part, c in counts.items())
    return f"{branch} branch parameters: {parts}"


def log_branch_counts(module: torch.nn.Module, branch: str, pgs: ProcessGroupCollection,
                      device: torch.device) -> dict[str, PartCounts]:
    """Count the branch's parameters (collective over its model-parallel group) and log them
    once, from the branch's first rank; return the counts."""
    counts = branch_parameter_counts(module, branch, pgs, device)
    if pgs.tp_dp_cp.rank() == 0 and pgs.pp.rank() == 0:
        logger.info("%s", format_counts(branch, counts))
    return counts
