"""Images branch: CLIP-style ViT (megatron-core ``CLIPViTModel``) + MLP projector.

The encoder outputs one embedding per patch (no class token), so an image fills exactly
``num_patches`` image-token positions of the text sequence.
"""

from __future__ import annotations

import torch
from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mimo.config import EncoderModelConfig
from megatron_mimo.models.common import TransformerShape, build_transformer_config, te_available

ENCODER_NAME = "vit"
"""Key of the ViT inside the images submodule (``modality_inputs['images']['vit']``)."""


def _layer_spec_and_norm(device: torch.device):
    if te_available(device):
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.vision.vit_layer_specs import (
            get_vit_layer_with_transformer_engine_spec,
        )

        return get_vit_layer_with_transformer_engine_spec(), TENorm
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return get_vit_layer_with_local_spec(), WrappedTorchNorm


def images_submodule_spec(cfg: EncoderModelConfig, language_hidden_size: int, tp: int,
                          pgs: ProcessGroupCollection, device: torch.device) -> ModuleSpec:
    """ModuleSpec of the images branch for ``MimoModel`` (ViT encoder + 2-layer MLP projector)."""
    shape = TransformerShape.of(cfg)
    vit_config = build_transformer_config(shape, tp, device)
    layer_spec, norm = _layer_spec_and_norm(device)
    vit = ModuleSpec(module=CLIPViTModel, params={
        "transformer_config": vit_config, "transformer_layer_spec": layer_spec,
        "ln_pre_impl": norm, "add_class_token": False, "class_token_len": 0,
        "patch_dim": cfg.patch_size, "img_h": cfg.image_size, "img_w": cfg.image_size,
        "pg_collection": pgs,
    })
    projector_config = build_transformer_config(
        TransformerShape(1, language_hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size),
        tp, device)
    projector = ModuleSpec(module=MultimodalProjector, params={
        "config": projector_config,
        "submodules": MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        "projector_type": "mlp", "input_size": cfg.hidden_size, "pg_collection": pgs,
    })
    return ModuleSpec(module=VisionModalitySubmodules,
                      submodules={"encoders": {ENCODER_NAME: vit}, "input_projections": [projector]},
                      params={"pg_collection": pgs})


def images_inputs(pixels: torch.Tensor) -> dict:
    """``modality_inputs`` entry for a batch of images ``[b, 3, H, W]``."""
    return {ENCODER_NAME: {"x": pixels}}
