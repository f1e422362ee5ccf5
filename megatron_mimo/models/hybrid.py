"""Language branch as megatron-core's Mamba-hybrid ``MambaModel`` (layer pattern of Mamba
'M', attention '*' and MLP '-' layers), with the branch's process groups.

With Transformer Engine and mamba-ssm (a GPU build) the stock ``hybrid_stack_spec`` is used.
Otherwise a local spec: ``CpuMambaMixer`` and megatron-core's local attention/MLP layers, with
norms kept as separate modules but checkpointed under the TE names
(``...in_proj.layer_norm_weight``, ``...linear_qkv.layer_norm_weight``,
``...linear_fc1.layer_norm_weight``), so a checkpoint moves between the two builds.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_mimo.config import LanguageModelConfig
from megatron_mimo.models.common import build_transformer_config, te_available
from megatron_mimo.models.mamba_cpu import CpuMambaMixer
from megatron_mimo.models.stages import seed_hybrid_layers, stage_flags


def stock_kernels_available(device: torch.device) -> bool:
    """GPU build: TE for norms/linears and mamba-ssm for the mixer."""
    return te_available(device) and importlib.util.find_spec("mamba_ssm") is not None


def local_hybrid_stack_spec() -> ModuleSpec:
    """HybridStack spec from megatron-core's local modules and :class:`CpuMambaMixer`."""
    gpt = get_gpt_layer_local_submodules(normalization="RMSNorm")
    attention = TransformerLayerSubmodules(
        input_layernorm=gpt.input_layernorm, self_attention=gpt.self_attention,
        self_attn_bda=gpt.self_attn_bda,
        sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})
    mlp = TransformerLayerSubmodules(
        pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=gpt.mlp, mlp_bda=gpt.mlp_bda,
        sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})
    mamba = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        norm=WrappedTorchNorm,
        mixer=ModuleSpec(module=CpuMambaMixer, submodules=MambaMixerSubmodules(
            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
        mamba_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"}))
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        mamba_layer=mamba,
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp)))


def hybrid_stack_spec(device: torch.device) -> ModuleSpec:
    """Stock TE + mamba-ssm stack on a GPU build, the local one otherwise."""
    if stock_kernels_available(device):
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as stock

        return stock
    return local_hybrid_stack_spec()


def mamba_hybrid_spec(cfg: LanguageModelConfig, tp: int, pgs: ProcessGroupCollection | None,
                      device: torch.device, precision: str = "fp32", init_seed: int = 0,
                      pp: int = 1) -> ModuleSpec:
    """ModuleSpec of this rank's pipeline stage of the Mamba-hybrid language model for
    ``MimoModel``: the pattern is split into ``pp`` equal segments (megatron-core picks this
    stage's), the embedding is on the first stage, output layer and loss on the last. Layers
    initialise from ``init_seed`` and their global number, whatever the split."""
    config = build_transformer_config(
        cfg, tp, device, precision, pp=pp, normalization="RMSNorm",
        mamba_state_dim=cfg.mamba_state_dim, mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups)
    return ModuleSpec(module=MambaModel, params={
        "config": config, "hybrid_stack_spec": seed_hybrid_layers(hybrid_stack_spec(device), init_seed),
        "vocab_size": cfg.vocab_size, "max_sequence_length": cfg.seq_length,
        # '|' between the stage segments: megatron-core's explicit split (its implicit one is
        # deprecated and warns)
        "hybrid_layer_pattern": "|".join(cfg.stage_patterns(pp)),
        "position_embedding_type": "none",
        "share_embeddings_and_output_weights": not cfg.untie_embeddings_and_output_weights,
        **stage_flags(pgs), "pg_collection": pgs,
    })
