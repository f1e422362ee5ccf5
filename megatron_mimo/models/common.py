"""Pieces shared by the branch builders: TransformerConfig, spec flavour, per-branch init seed."""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mimo.config import AUDIO, IMAGES, LANGUAGE, TransformerSizes

BRANCH_SEED_OFFSET = {IMAGES: 0, LANGUAGE: 1000, AUDIO: 2000}
"""Weights of each branch come from their own seed so no two branches share an init."""


def branch_init_seed(seed: int, branch: str) -> int:
    """Seed the default generator gets right before a branch's modules are built."""
    return seed + BRANCH_SEED_OFFSET[branch]


def te_available(device: torch.device) -> bool:
    """Whether Transformer Engine specs can be used (installed, and the device is a GPU)."""
    return device.type == "cuda" and importlib.util.find_spec("transformer_engine") is not None


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Training dtype of each ``--bf16`` / ``--fp16`` / default precision."""


def pipeline_overrides(pp: int) -> dict:
    """TransformerConfig fields megatron-core's multi-module schedule needs (it runs every step):
    the branch's stage count (else every stage builds every layer, silently) and variable sequence
    lengths (the schedule asserts them), which in turn need the alltoall dispatcher even for a
    dense model (``TransformerConfig`` validation)."""
    return {"pipeline_model_parallel_size": pp, "variable_seq_lengths": True,
            "moe_token_dispatcher_type": "alltoall"}


def build_transformer_config(shape: TransformerSizes, tp: int, device: torch.device,
                             precision: str = "fp32", pp: int = 1, **overrides) -> TransformerConfig:
    """TransformerConfig for one branch; CPU-safe fusions off when not on a GPU.

    Parameters are created in fp32 (CPU initialisation draws every shard from one fp32 master
    weight, so any TP gives the same model); in bf16/fp16 the branch is then cast by megatron's
    ``Float16Module``, which reads ``bf16``/``fp16`` from this config."""
    on_gpu = device.type == "cuda"
    fields = dict(
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        ffn_hidden_size=shape.ffn_hidden_size,
        hidden_dropout=shape.hidden_dropout,
        attention_dropout=shape.attention_dropout,
        layernorm_epsilon=shape.norm_epsilon,
        tensor_model_parallel_size=tp,
        params_dtype=torch.float32,
        pipeline_dtype=TORCH_DTYPES[precision],
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=0.02,
        calculate_per_token_loss=True,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **pipeline_overrides(pp),
    )
    return TransformerConfig(**{**fields, **overrides})
