"""Assemble the non-colocated ``MimoModel``: each rank builds and DDP-wraps only its branch.

The encoders (images, and audio when the job has that branch) are ``MimoModel`` modality
submodules keyed by branch name; each fills the slots of its own special token in the text."""

from __future__ import annotations

import logging

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.mimo import MimoModel, MimoModelConfig
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mimo.compat.mcore import apply_branch_tp_group
from megatron_mimo.config.layout import AUDIO, IMAGES, LANGUAGE
from megatron_mimo.config.precision import PrecisionConfig
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.models.common import TORCH_DTYPES, branch_init_seed
from megatron_mimo.models.freezing import freeze_branch, log_branch_counts
from megatron_mimo.models.hybrid import mamba_hybrid_spec
from megatron_mimo.models.language import gpt_spec
from megatron_mimo.models.vision import images_submodule_spec

logger = logging.getLogger(__name__)


def branch_specs(cfg: MimoConfig, topology: Topology, device: torch.device) -> dict[str, ModuleSpec]:
    """ModuleSpec of every branch; only this rank's branch gets real process groups."""
    def pgs_or_none(name):
        return topology.pgs(name) if topology.in_branch(name) else None

    specs = {IMAGES: images_submodule_spec(cfg.images, cfg.language.hidden_size,
                                           cfg.images_parallel.tp, pgs_or_none(IMAGES), device,
                                           cfg.precision.name)}
    if AUDIO in cfg.branches:
        from megatron_mimo.models.audio import audio_submodule_spec

        specs[AUDIO] = audio_submodule_spec(cfg.audio, cfg.language.hidden_size,
                                            cfg.parallel(AUDIO).tp, pgs_or_none(AUDIO), device,
                                            cfg.precision.name)
    specs[LANGUAGE] = language_spec(cfg, pgs_or_none(LANGUAGE), device)
    return specs


def special_token_ids(cfg: MimoConfig) -> dict[str, int]:
    """The token id whose slots each encoder fills."""
    ids = {IMAGES: cfg.language.image_token_id, AUDIO: cfg.language.audio_token_id}
    return {encoder: ids[encoder] for encoder in cfg.encoders}


def language_spec(cfg: MimoConfig, pgs, device: torch.device) -> ModuleSpec:
    """GPT or Mamba-hybrid language model, by ``--llm-kind``."""
    build = mamba_hybrid_spec if cfg.language.kind == "mamba_hybrid" else gpt_spec
    return build(cfg.language, cfg.language_parallel.tp, pgs, device, cfg.precision.name,
                 init_seed=branch_init_seed(cfg.training.seed, LANGUAGE), pp=cfg.language_parallel.pp)


def ddp_config(grads_in_fp32: bool) -> DistributedDataParallelConfig:
    """Per-branch DDP: grads summed over the branch's DP (the loss is per token)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=grads_in_fp32, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=True, average_in_collective=False, bucket_size=None,
    )


def build_mimo_model(cfg: MimoConfig, topology: Topology, device: torch.device) -> MimoModel:
    """Build this rank's branch inside a role-aware MimoModel and wrap it in the branch's DDP.

    The default generator is seeded per branch right before building, so a branch's initial
    weights do not depend on the layout (CPU initialisation also makes them TP-independent).
    The --freeze-* flags take effect here, before the wrapping (:mod:`.freezing`).
    """
    specs = branch_specs(cfg, topology, device)
    mimo_config = MimoModelConfig(
        language_model_spec=specs[LANGUAGE],
        modality_submodules_spec={name: specs[name] for name in cfg.encoders},
        special_token_ids=special_token_ids(cfg),
        module_to_grid_map={name: topology.grid(name) for name in cfg.branches},
    )
    torch.manual_seed(branch_init_seed(cfg.training.seed, topology.my_branch))
    model = MimoModel(mimo_config)
    model.to(device)
    branch = topology.my_branch
    pgs = topology.pgs(branch)
    fixed = apply_branch_tp_group(model, pgs.tp)
    logger.debug("%s branch: set the branch TP group on %s", branch, ", ".join(fixed) or "nothing")
    inner = branch_module(model, branch)
    # before DDP: DDP allocates gradient buffers for, and the optimizer takes, trainable params only
    freeze_branch(inner, branch, cfg.training)
    log_branch_counts(inner, branch, pgs, device)
    if branch == LANGUAGE:
        model.language_model = wrap_branch(inner, pgs, inner.config, cfg.precision)
    else:
        model.modality_submodules[branch] = wrap_branch(inner, pgs, _first_config(inner),
                                                        cfg.precision)
    return model


def _first_config(module: torch.nn.Module):
    for child in module.modules():
        if isinstance(child, MegatronModule) and child is not module:
            return child.config
    raise ValueError(f"{type(module).__name__} holds no MegatronModule with a config")


def wrap_branch(module: torch.nn.Module, pgs, config, precision: PrecisionConfig
                ) -> DistributedDataParallel:
    """Wrap one branch module: megatron's ``Float16Module`` in bf16/fp16 (casts the weights and
    the positional inputs of the first stage), then DDP over the branch's DP group."""
    if precision.name != "fp32":
        module = Float16Module(config, module)
        # Float16Module reads the PP group from pg_collection, else from parallel_state
        module.pg_collection = pgs
        # the weights are 16-bit from here on (created in fp32, see build_transformer_config),
        # and params_dtype must say so: MambaLayer casts its input to params_dtype in forward
        config.params_dtype = TORCH_DTYPES[precision.name]
    return DistributedDataParallel(config=config, ddp_config=ddp_config(precision.grads_in_fp32),
                                   module=module, pg_collection=pgs)


def branch_module(model: MimoModel, branch: str) -> torch.nn.Module:
    """The module of ``branch`` on this rank (DDP-wrapped once :func:`build_mimo_model` returns)."""
    return model.language_model if branch == LANGUAGE else model.modality_submodules[branch]
