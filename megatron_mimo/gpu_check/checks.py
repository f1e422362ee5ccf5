"""The checks: each takes the :class:`Session` and returns one :class:`~.names.Result`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_mimo.config import IMAGES, LANGUAGE
from megatron_mimo.distributed.runtime import Runtime
from megatron_mimo.gpu_check import builds
from megatron_mimo.gpu_check.cpu_save import (
    CpuCheckpoint,
    cpu_only_torchrun,
    run_logged,
    save_on_cpu,
    torchrun,
)
from megatron_mimo.gpu_check.names import (
    FAIL,
    PASS,
    Result,
    copy_parameters,
    perturb_parameters,
    relative_error,
    same_name,
    te_name,
    within,
)

TOLERANCE = {"gpt": 2e-3, "vit": 2e-3, "radio": 2e-3, "mamba_hybrid": 1e-2}
"""Bound on max|GPU build - reference| / max|reference|, both in fp32 (TF32 off in torch). TE's
and mamba-ssm's kernels may still multiply fp32 in TF32 (10-bit mantissa; mamba-ssm's Triton
scan does by default), hence the larger bound for the hybrid. A weight in the wrong place or a
different activation moves the output by O(1)."""

TRAINER_TIMEOUT_S = 900


@dataclass
class Session:
    """What the checks share: the one-rank world, the device, the scratch directory, the CPU
    checkpoints (one per preset, written on first use). ``rehearsal``: everything runs on the CPU
    with the local spec standing in for the GPU build (tests this script, not the GPU)."""

    runtime: Runtime
    pgs: ProcessGroupCollection
    scratch: Path
    log: Path
    base_env: dict[str, str]
    rehearsal: bool
    saved: dict[str, CpuCheckpoint] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where the checks run."""
        return self.runtime.device

    def cpu_checkpoint(self, preset: str) -> CpuCheckpoint:
        """The CPU checkpoint of ``preset`` (saved on first use)."""
        if preset not in self.saved:
            self.saved[preset] = save_on_cpu(preset, self.scratch / preset, self.log, self.base_env)
        return self.saved[preset]

    def gpu_build(self, kind: str, precision: str = "fp32", stock: bool = True
                  ) -> torch.nn.Module:
        """The branch as training builds it here (TE specs when installed and on a GPU). With
        ``stock``, outside a rehearsal, it must hold Transformer Engine modules (and, for the
        hybrid, mamba-ssm's mixer)."""
        preset, side = builds.KINDS[kind]
        module = builds.build_side(builds.preset_config(preset, precision), side, self.pgs,
                                   self.device)
        if stock and not self.rehearsal:
            _require_stock_modules(module, kind)
        return module

    def suffix(self) -> str:
        """Marks a rehearsal's lines."""
        return " [CPU rehearsal: local spec on both sides]" if self.rehearsal else ""


def _require_stock_modules(module: torch.nn.Module, kind: str) -> None:
    from megatron_mimo.models.mamba_cpu import CpuMambaMixer

    if not builds.uses_transformer_engine(module):
        raise RuntimeError("the GPU build holds no Transformer Engine module")
    if kind == "mamba_hybrid" and any(isinstance(m, CpuMambaMixer) for m in module.modules()):
        raise RuntimeError("the GPU build uses CpuMambaMixer, not mamba-ssm's MambaMixer")


def parity(session: Session, kind: str) -> Result:
    """Local build vs GPU build of one branch: the local weights (moved off their initial values)
    copied into the GPU build by name, the same input through both, fp32."""
    preset, side = builds.KINDS[kind]
    cfg = builds.preset_config(preset)
    with builds.local_specs():
        local = builds.build_side(cfg, side, session.pgs, session.device)
    perturb_parameters(local, cfg.training.seed)
    candidate = session.gpu_build(kind)
    rename = te_name if builds.uses_transformer_engine(candidate) else same_name
    copied = copy_parameters(local, candidate, rename)
    reference = builds.evaluate_side(local, cfg, side, session.device)
    output = builds.evaluate_side(candidate, cfg, side, session.device)
    return within(f"parity/{kind}", relative_error(output, reference), TOLERANCE[kind],
                  f"{copied} tensors copied, output {list(output.shape)}{session.suffix()}")


def finetune_load(session: Session, kind: str) -> Result:
    """The CPU checkpoint's weights of one branch loaded into the GPU build; its output vs the
    output the CPU computed with the same weights."""
    preset, side = builds.KINDS[kind]
    cfg = builds.preset_config(preset)
    saved = session.cpu_checkpoint(preset)
    candidate = session.gpu_build(kind)
    reference = torch.load(saved.reference(side), weights_only=True)
    fresh = relative_error(builds.evaluate_side(candidate, cfg, side, session.device), reference)
    if fresh <= TOLERANCE[kind]:
        return Result(FAIL, f"finetune-load/{kind}", f"a fresh build already matches the CPU "
                      f"output ({fresh:.2e}): the check cannot tell a load from none")
    loaded = builds.load_side(candidate, side, saved.checkpoints)
    output = builds.evaluate_side(candidate, cfg, side, session.device)
    return within(f"finetune-load/{kind}", relative_error(output, reference), TOLERANCE[kind],
                  f"{loaded} tensors from the CPU checkpoint; a fresh build: {fresh:.1e}"
                  f"{session.suffix()}")


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _first_config(module: torch.nn.Module):
    from megatron.core.transformer.module import MegatronModule

    return next(m.config for m in module.modules()
                if isinstance(m, MegatronModule) and m is not module)


def _loss(cfg, images, language, device: torch.device) -> torch.Tensor:
    """Mean per-token loss of one mock batch: images encoded, scattered into the text
    embeddings at the image tokens, then the language model (as one stage with no bridge)."""
    from megatron_mimo.data.mock import MockImageText
    from megatron_mimo.models.vision import images_inputs

    data = MockImageText(cfg.images, cfg.language, cfg.training.seed)
    indices, dtype = [0, 1], torch.bfloat16
    batch = {k: v.to(device) for k, v in data.tokens(indices).items()}
    image_emb = images(encoder_inputs=images_inputs(data.pixels(indices).to(device, dtype)))
    is_image = batch["input_ids"] == cfg.language.image_token_id
    text_emb = _unwrapped(language).embedding(
        input_ids=batch["input_ids"].masked_fill(is_image, 0),
        position_ids=batch["position_ids"]).transpose(0, 1)
    placed = torch.zeros_like(text_emb)
    placed[is_image] = image_emb.to(dtype)
    combined = torch.where(is_image.unsqueeze(-1), placed, text_emb).transpose(0, 1).contiguous()
    token_loss = language(input_ids=None, position_ids=batch["position_ids"],
                          decoder_input=combined, labels=batch["labels"], attention_mask=None)
    mask = batch["loss_mask"].float()
    return (token_loss.float() * mask).sum() / mask.sum()


def _wrapped_with_optimizer(session: Session, cfg, side: str, module: torch.nn.Module):
    """``module`` in bf16 as training wraps it (Float16Module, DDP) and its
    DistributedOptimizer (fp32 main parameters) at the branch's peak learning rate."""
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_mimo.models.mimo import wrap_branch
    from megatron_mimo.training.optimizer import mcore_optimizer_config

    ddp = wrap_branch(module, session.pgs, _first_config(module) if side == IMAGES
                      else module.config, cfg.precision)
    optimizer = get_megatron_optimizer(config=mcore_optimizer_config(cfg, side),
                                       model_chunks=[ddp], pg_collection=session.pgs,
                                       use_gloo_process_groups=False)
    for group in optimizer.param_groups:
        group["lr"] = cfg.optimizer.branch_lr(side)[0]
    return ddp, optimizer


def bf16_step(session: Session, preset: str) -> Result:
    """One bf16 step of both branches: loss and grad norms finite, weights of both changed."""
    cfg = builds.preset_config(preset, "bf16")
    kinds = {side: kind for kind, (p, side) in builds.KINDS.items() if p == preset}
    ddps, optimizers = {}, {}
    for side in (IMAGES, LANGUAGE):
        module = session.gpu_build(kinds[side], "bf16", stock=False)
        ddps[side], optimizers[side] = _wrapped_with_optimizer(session, cfg, side, module)
    before = {s: [p.detach().clone() for p in d.parameters()] for s, d in ddps.items()}
    for side in ddps:
        ddps[side].zero_grad_buffer()
        optimizers[side].zero_grad()
    loss = _loss(cfg, ddps[IMAGES], ddps[LANGUAGE], session.device)
    loss.backward()
    ok, details = math.isfinite(loss.item()), []
    for side, ddp in ddps.items():
        ddp.finish_grad_sync()
        success, norm, _ = optimizers[side].step()
        changed = sum(not torch.equal(b, p)
                      for b, p in zip(before[side], ddp.parameters(), strict=True))
        ok = ok and bool(success) and math.isfinite(norm) and norm > 0 and changed > 0
        details.append(f"{side}: grad norm {norm:.3g}, {changed}/{len(before[side])} tensors "
                       f"changed")
    flavour = "TE" if builds.uses_transformer_engine(ddps[LANGUAGE]) else "local"
    return Result(PASS if ok else FAIL, f"bf16-step/{preset}",
                  f"loss {loss.item():.4f}; {'; '.join(details)} ({flavour} build)"
                  f"{session.suffix()}")


def finetune_2gpu(session: Session, preset: str) -> Result:
    """``megatron-mimo --finetune`` from the CPU checkpoint, one iteration on 2 ranks (one GPU
    each); its loss must be finite."""
    saved = session.cpu_checkpoint(preset)
    metrics = session.scratch / f"finetune-{preset}.jsonl"
    args = ["--config", preset, *builds.TWO_RANK_FLAGS, "--load", str(saved.checkpoints),
            "--finetune", "--train-iters", "1", "--metrics-file", str(metrics)]
    env = {**session.base_env, "MIMO_DEVICE": session.device.type, "TORCHDYNAMO_DISABLE": "1"}
    command = (cpu_only_torchrun({"main": args}) if session.rehearsal
               else torchrun(2, "megatron_mimo.main", args))
    run_logged(command, env, session.log, TRAINER_TIMEOUT_S)
    record = json.loads(metrics.read_text().splitlines()[-1])
    ok = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    where = "2 CPU ranks" if session.rehearsal else "2 GPUs"
    return Result(PASS if ok else FAIL, f"finetune-2gpu/{preset}",
                  f"--finetune from the CPU checkpoint, 1 iteration on {where}: loss "
                  f"{record['loss']:.4f}, grad norm {record['grad_norm']:.3g}{session.suffix()}")

