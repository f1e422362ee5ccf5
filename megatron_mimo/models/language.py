"""Language branch: megatron-core ``GPTModel`` with rotary positions, returning per-token loss."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mimo.config import LanguageModelConfig
from megatron_mimo.models.common import build_transformer_config, te_available


def _layer_spec(device: torch.device) -> ModuleSpec:
    if te_available(device):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec()


def gpt_spec(cfg: LanguageModelConfig, tp: int, pgs: ProcessGroupCollection,
             device: torch.device, precision: str = "fp32") -> ModuleSpec:
    """ModuleSpec of the language model for ``MimoModel`` (one PP stage)."""
    config = build_transformer_config(cfg, tp, device, precision)
    return ModuleSpec(module=GPTModel, params={
        "config": config, "transformer_layer_spec": _layer_spec(device),
        "vocab_size": cfg.vocab_size, "max_sequence_length": cfg.seq_length,
        "position_embedding_type": "rope", "share_embeddings_and_output_weights": False,
        "pre_process": True, "post_process": True, "pg_collection": pgs,
    })
