"""Language branch: megatron-core ``GPTModel`` (GPT or Llama family), returning per-token loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mimo.config import LanguageModelConfig
from megatron_mimo.models.common import build_transformer_config, te_available
from megatron_mimo.models.stages import apply_layer_seeding, stage_flags


def _layer_spec(device: torch.device, normalization: str) -> ModuleSpec:
    if te_available(device):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization=normalization)


def gpt_overrides(cfg: LanguageModelConfig) -> dict:
    """TransformerConfig fields of the GPT family (Llama: RMSNorm, SwiGLU, grouped-query
    attention, no biases); megatron-core's defaults otherwise."""
    return {"normalization": cfg.normalization, "gated_linear_unit": cfg.swiglu,
            "activation_func": F.silu if cfg.swiglu else F.gelu,
            "num_query_groups": cfg.num_query_groups,
            "add_bias_linear": not cfg.disable_bias_linear}


def gpt_spec(cfg: LanguageModelConfig, tp: int, pgs: ProcessGroupCollection | None,
             device: torch.device, precision: str = "fp32", init_seed: int = 0,
             pp: int = 1) -> ModuleSpec:
    """ModuleSpec of this rank's pipeline stage of the language model for ``MimoModel``: its
    layers, the embedding on the first stage, output layer and loss on the last. Layers
    initialise from ``init_seed`` and their global number, whatever the stage split. ``pp`` is
    the branch's stage count (also on ranks outside the branch: ``MimoModel`` and the schedule
    read this config on every rank)."""
    config = build_transformer_config(cfg, tp, device, precision, pp=pp, **gpt_overrides(cfg))
    layer_spec = _layer_spec(device, cfg.normalization)
    return ModuleSpec(module=GPTModel, params={
        "config": config,
        "transformer_layer_spec": apply_layer_seeding(layer_spec, init_seed),
        "vocab_size": cfg.vocab_size, "max_sequence_length": cfg.seq_length,
        "position_embedding_type": cfg.position_embedding_type, "rotary_base": cfg.rotary_base,
        "share_embeddings_and_output_weights": not cfg.untie_embeddings_and_output_weights,
        **stage_flags(pgs), "pg_collection": pgs,
    })


def count_correct_answers(logits: torch.Tensor, batch: dict[str, torch.Tensor],
                          tp: dist.ProcessGroup) -> torch.Tensor:
    """Samples whose argmax over the whole vocabulary, at the position whose label is the
    answer word, is that word. Logits are split over the language TP ranks by vocabulary: each
    rank offers its best (value, id) and the TP group picks the highest."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_answer = logits[rows, batch["answer_position"]].float()  # [b, vocab / tp]
    best, index = at_answer.max(dim=-1)
    index = index + tp.rank() * at_answer.shape[-1]
    candidates = [torch.empty_like(best) for _ in range(tp.size())]
    ids = [torch.empty_like(index) for _ in range(tp.size())]
    dist.all_gather(candidates, best, group=tp)
    dist.all_gather(ids, index, group=tp)
    winner = torch.stack(candidates).argmax(dim=0)
    predicted = torch.stack(ids)[winner, rows]
    answer = batch["labels"][rows, batch["answer_position"]]
    return (predicted == answer).sum().float()
