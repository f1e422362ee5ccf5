"""Training worlds for the hetero-training tests.

mode "reference": 1 rank, both branches built side by side and trained with plain torch AdamW on
    the full global batch, no bridge, no DDP, no distributed optimizer: the independent truth.
mode "hetero": the real job on 2 ranks (images rank 0, language rank 1).
mode "layouts": the real job on 4 ranks, two layouts in turn, then a found-inf injected on the
    images ranks only.
mode "pipeline": the real job on 4 ranks with the language branch over 2 pipeline stages
    (megatron-core's 1F1B schedule, 4 micro-batches), then a found-inf on the last stage only;
    then three branches (images rank 0, audio rank 1) with language TP2 and with language PP2,
    and the three-branch ablations (:data:`AV_ABLATIONS`): each input carries its own answer.
Each mode returns its dataclass below; the production iteration record (``Trainer.step()``)
stays a dict inside :class:`Step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_mimo.config import AUDIO, IMAGES, LANGUAGE, MimoConfig
from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.presets import tiny_cpu
from megatron_mimo.distributed.runtime import model_parallel_state_is_untouched
from tests.workers.common import worker_main

ITERS = 6
LAYOUTS = {
    "images_tp1dp2_language_tp2dp1": {},
    "images_tp2dp1_language_tp1dp2": {"images_parallel.tp": 2, "images_parallel.dp": 1,
                                      "language_parallel.tp": 1, "language_parallel.dp": 2,
                                      "training.micro_batch_size": 1},
}
PIPELINE = {"language_parallel.tp": 1, "language_parallel.pp": 2}
"""Images TP1xDP2 on ranks 0-1, language TP1xDP1xPP2 on ranks 2-3: 4 micro-batches."""
HYBRID = {"language.kind": "mamba_hybrid", "language.num_layers": 4}
"""The Mamba hybrid 'M*M-': stage 0 runs 'M*', stage 1 'M-'."""
LLAMA = {"language.normalization": "RMSNorm", "language.swiglu": True,
         "language.num_query_groups": 2, "language.disable_bias_linear": True,
         "language.rotary_base": 500000, "language.untie_embeddings_and_output_weights": False}
"""A Llama-family GPT: RMSNorm, SwiGLU, 4 heads over 2 key/value groups (one per TP rank at
TP2), no biases, RoPE base 500000, output layer tied to the word embeddings."""
LLAMA_LAYOUT = "llama_images_tp1dp2_language_tp2dp1"
AV = {"images_parallel.dp": 1, "audio_parallel.offset": 1, "audio.hidden_dropout": 0.0,
      "language.seq_length": 64}
"""Three branches: images on rank 0, audio on rank 1, language (TP2) on ranks 2-3."""
AV_LAYOUTS = {"av_language_tp2": AV, "av_language_pp2": {**AV, **PIPELINE}}
AV_LEARN_ITERS = 100
AV_LEARN = {**AV, "language.seq_length": 30, "training.train_iters": AV_LEARN_ITERS,
            "training.micro_batch_size": 16, "training.global_batch_size": 16,
            "training.eval_iters": 4, "scheduler.lr_warmup_iters": 5, "optimizer.lr": 3e-3,
            "optimizer.images_lr": 3e-3, "optimizer.audio_lr": 3e-3}
"""Mock samples: the first text token names the image's class, the second the clip's (16
classes each; chance is 1/16). A short text (5 tokens after the 24 media slots) keeps the two
answers a large share of the loss, so both are learned in few iterations."""
AV_ABLATIONS = {"blank_audio": {"data.blank_audio": True},
                "blank_images": {"data.blank_images": True}}


@dataclass
class Step:
    """One iteration: the production record and what the test observed around the step."""

    record: dict
    params_changed: bool
    """Some parameter of this rank's branch changed in the step."""
    lr_before: dict[str, float]
    sched_steps: int
    """The schedulers' step count after the step."""


@dataclass
class Eval:
    """Held-out loss and answer accuracy after the run."""

    loss: float
    accuracy: float
    audio_accuracy: float | None = None
    """With an audio branch: the clip's answer."""


@dataclass
class JobRun:
    """The real job trained for some iterations on one rank."""

    branch: str
    stage: int
    """This rank's pipeline stage in its branch."""
    local_parameters: int
    steps: list[Step]
    eval: Eval


@dataclass
class ReferenceStep:
    """One iteration of the single-rank reference."""

    loss: float
    grad_norm: float
    lr: dict[str, float]


@dataclass
class References:
    """Mode "reference": the single-rank truth per language model kind."""

    gpt: list[ReferenceStep]
    mamba_hybrid: list[ReferenceStep]
    llama: list[ReferenceStep]
    av: list[ReferenceStep]
    """Three branches (images, audio, GPT)."""


@dataclass
class Layouts:
    """Mode "layouts" on one rank."""

    world_rank: int
    runs: dict[str, JobRun]
    """By layout name (:data:`LAYOUTS`, and :data:`LLAMA_LAYOUT`)."""
    found_inf: JobRun
    """Three iterations, a found-inf on the images ranks only at the second."""
    parallel_state_untouched: bool


@dataclass
class Pipeline:
    """Mode "pipeline" on one rank: language TP1xDP1xPP2 (:data:`PIPELINE`)."""

    world_rank: int
    gpt: JobRun
    mamba_hybrid: JobRun
    found_inf: JobRun
    """GPT, three iterations, a found-inf on the last language stage only at the second."""
    av: dict[str, JobRun]
    """By :data:`AV_LAYOUTS` name."""
    ablations: dict[str, Eval]
    """Held-out accuracies after :data:`AV_LEARN_ITERS` by :data:`AV_ABLATIONS` name."""


def make_cfg(overrides: dict[str, Any]) -> MimoConfig:
    base = {"optimizer.weight_decay": 0.0, "scheduler.lr_warmup_iters": 2,
            "training.train_iters": ITERS, "training.global_batch_size": 8,
            "training.micro_batch_size": 2}
    return apply_overrides(tiny_cpu(), {**base, **overrides})


def run_job(cfg: MimoConfig, iterations: int, inject_found_inf_at: int | None = None,
            inject_branch: str = IMAGES) -> JobRun:
    """Train ``iterations`` steps with the Trainer, optionally a found-inf on ``inject_branch``
    (its last stage) at iteration ``inject_found_inf_at``."""
    from megatron_mimo.training.trainer import Trainer

    steps = []
    with Trainer(cfg) as trainer:
        injected_opt = trainer.job.optimizer.module_infos[inject_branch].optimizer
        if inject_branch == LANGUAGE and not trainer.job.is_last_stage():
            injected_opt = None  # inject on the last language stage only
        ddp = trainer.job.branch_ddp
        for it in range(1, iterations + 1):
            if inject_found_inf_at == it and injected_opt is not None:
                injected_opt.prepare_grads = lambda: True  # found inf on this branch (stage) only
            before = [p.detach().clone() for p in ddp.parameters()]
            lr_before = trainer.job.schedulers.lrs()
            record = trainer.step()
            if inject_found_inf_at == it and injected_opt is not None:
                del injected_opt.prepare_grads
            changed = any(not torch.equal(b, p) for b, p in zip(before, ddp.parameters(), strict=True))
            steps.append(Step(record=record, params_changed=changed, lr_before=lr_before,
                              sched_steps=trainer.job.schedulers.num_steps))
        held_out = trainer.evaluate()
        return JobRun(branch=trainer.branch, stage=trainer.job.topology.pgs().pp.rank(),
                      local_parameters=sum(p.numel() for p in ddp.parameters()), steps=steps,
                      eval=Eval(loss=held_out.loss, accuracy=held_out.accuracy,
                                audio_accuracy=held_out.audio_accuracy))


def _reference_encoders(cfg: MimoConfig, pgs) -> dict[str, tuple[torch.nn.Module, Any, int]]:
    """Every encoder of ``cfg`` built on one rank: (module, inputs of sample indices, the token
    id whose slots it fills)."""
    from megatron.core.models.mimo.submodules.audio import AudioModalitySubmodules
    from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules

    from megatron_mimo.data.mock import MockImageText
    from megatron_mimo.models.common import branch_init_seed
    from megatron_mimo.models.vision import images_inputs, images_submodule_spec

    cpu, seed = torch.device("cpu"), cfg.training.seed
    data = MockImageText(cfg.images, cfg.language, seed, **mock_audio(cfg))
    torch.manual_seed(branch_init_seed(seed, IMAGES))
    images = VisionModalitySubmodules.from_spec(
        images_submodule_spec(cfg.images, cfg.language.hidden_size, 1, pgs, cpu))
    out = {IMAGES: (images, lambda idx: images_inputs(data.pixels(idx)),
                    cfg.language.image_token_id)}
    if AUDIO in cfg.branches:
        from megatron_mimo.models.audio import audio_inputs, audio_submodule_spec

        torch.manual_seed(branch_init_seed(seed, AUDIO))
        audio = AudioModalitySubmodules.from_spec(
            audio_submodule_spec(cfg.audio, cfg.language.hidden_size, 1, pgs, cpu))
        out[AUDIO] = (audio, lambda idx: audio_inputs(data.audio(idx)),
                      cfg.language.audio_token_id)
    return out


def mock_audio(cfg: MimoConfig) -> dict[str, Any]:
    """The mock dataset's audio arguments of ``cfg`` (none without an audio branch)."""
    return {"audio": cfg.audio_model}


def reference(cfg: MimoConfig, iterations: int) -> list[ReferenceStep]:
    """Every branch on one rank, full batch, torch AdamW, megatron's LR scheduler."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mimo.config.layout import branch_spec
    from megatron_mimo.data.mock import MockImageText
    from megatron_mimo.distributed.topology import build_topology
    from megatron_mimo.models.common import branch_init_seed
    from megatron_mimo.models.mimo import language_spec
    from megatron_mimo.training.optimizer import build_scheduler
    from megatron_mimo.training.seeding import seed_rank

    topo = build_topology([branch_spec("solo")])
    pgs, cpu, seed = topo.pgs(), torch.device("cpu"), cfg.training.seed
    seed_rank(seed, LANGUAGE, 0)
    encoders = _reference_encoders(cfg, pgs)
    torch.manual_seed(branch_init_seed(seed, LANGUAGE))
    lm = build_module(language_spec(cfg, pgs, cpu))  # GPT or Mamba hybrid, one stage
    opt = cfg.optimizer
    optimizers, schedulers = {}, {}
    modules = {**{name: module for name, (module, _, _) in encoders.items()}, LANGUAGE: lm}
    for name, module in modules.items():
        optimizers[name] = torch.optim.AdamW(module.parameters(), lr=0.0, betas=(opt.adam_beta1, opt.adam_beta2),
                                             eps=opt.adam_eps, weight_decay=0.0)
        schedulers[name] = build_scheduler(cfg, optimizers[name], name)
    data = MockImageText(cfg.images, cfg.language, seed, **mock_audio(cfg))
    params = [p for module in modules.values() for p in module.parameters()]
    gbs, records = cfg.training.global_batch_size, []
    for it in range(iterations):
        indices = list(range(it * gbs, (it + 1) * gbs))
        batch = data.tokens(indices)
        for p in params:
            p.grad = None
        ids = batch["input_ids"]
        media = torch.zeros_like(ids, dtype=torch.bool)
        for _, _, token in encoders.values():
            media |= ids == token
        text_emb = lm.embedding(input_ids=ids.masked_fill(media, 0),
                                position_ids=batch["position_ids"]).transpose(0, 1)  # [b, s, H]
        combined = text_emb
        for module, inputs, token in encoders.values():
            slots = ids == token
            placed = torch.zeros_like(text_emb)
            placed[slots] = module(encoder_inputs=inputs(indices))  # [b * tokens, H], in order
            combined = torch.where(slots.unsqueeze(-1), placed, combined)
        combined = combined.transpose(0, 1)
        token_loss = lm(input_ids=None, position_ids=batch["position_ids"],
                        decoder_input=combined.contiguous(), labels=batch["labels"],
                        attention_mask=None)
        loss = (token_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)).item()
        coeff = opt.clip_grad / (norm + 1e-6)
        if coeff < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coeff)
        for name in optimizers:
            optimizers[name].step()
            schedulers[name].step(increment=1)
        records.append(ReferenceStep(loss=loss.item(), grad_norm=norm, lr={
            n: s.get_lr(s.optimizer.param_groups[0]) for n, s in schedulers.items()}))
    topo.destroy()
    return records


def body(args: dict[str, Any]) -> Any:
    mode = args["mode"]
    if mode == "reference":
        return References(gpt=reference(make_cfg({}), ITERS),
                          mamba_hybrid=reference(make_cfg(HYBRID), ITERS),
                          llama=reference(make_cfg(LLAMA), ITERS),
                          av=reference(make_cfg(AV), ITERS))
    if mode == "hetero":
        cfg = make_cfg({"images_parallel.dp": 1, "language_parallel.offset": 1,
                        "language_parallel.tp": 1})
        return run_job(cfg, ITERS)
    if mode == "pipeline":
        return Pipeline(world_rank=dist.get_rank(),
                        gpt=run_job(make_cfg(PIPELINE), ITERS),
                        mamba_hybrid=run_job(make_cfg({**PIPELINE, **HYBRID}), ITERS),
                        found_inf=run_job(make_cfg(PIPELINE), 3, inject_found_inf_at=2,
                                          inject_branch=LANGUAGE),
                        av={name: run_job(make_cfg(over), ITERS)
                            for name, over in AV_LAYOUTS.items()},
                        ablations={name: run_job(make_cfg({**AV_LEARN, **over}),
                                                 AV_LEARN_ITERS).eval
                                   for name, over in AV_ABLATIONS.items()})
    runs = {name: run_job(make_cfg(over), ITERS) for name, over in
            {**LAYOUTS, LLAMA_LAYOUT: LLAMA}.items()}
    return Layouts(world_rank=dist.get_rank(), runs=runs,
                   found_inf=run_job(make_cfg({}), 3, inject_found_inf_at=2),
                   parallel_state_untouched=model_parallel_state_is_untouched())


if __name__ == "__main__":
    worker_main(body)
