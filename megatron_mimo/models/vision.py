"""Images branch: a ViT backbone (megatron-core ``CLIPViTModel`` for our ViT, CLIP and SigLIP
towers, ``RADIOViTModel`` for RADIO) cut at its feature layer, class tokens dropped, optional
pixel shuffle, then a 2-layer GELU MLP projector into the language hidden size. One image fills
exactly ``num_image_tokens`` image-token slots of the text.

LLaVA's conventions, which pretrained weights are only correct under: features are the output
of the feature layer (the penultimate for CLIP) before any final norm, CLIP's class token is
computed and then dropped, SigLIP has no class token and its final norm is not applied.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from megatron.core.activations import quick_gelu
from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.models.vision.radio import RADIOViTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_mimo.config import ImagesModelConfig, TransformerSizes
from megatron_mimo.models.common import build_transformer_config, te_available

ENCODER_NAME = "vit"
"""Key of the encoder inside the images submodule (``modality_inputs['images']['vit']``)."""


class PatchTokens(MegatronModule):
    """Backbone ``[b, cls + grid^2, h]`` -> patch tokens ``[b, (grid/s)^2, s^2 h]``.

    Drops the class tokens RADIO prepends and merges each s x s block of neighbouring patch
    embeddings into one token (pixel shuffle), as RADIO-based VLMs feed their projector.
    """

    def __init__(self, backbone: ModuleSpec, class_tokens: int, pixel_shuffle: int, grid: int,
                 tp_group) -> None:
        super().__init__(config=backbone.params["transformer_config"])
        self.backbone = build_module(backbone)
        self.class_tokens, self.pixel_shuffle, self.grid = class_tokens, pixel_shuffle, grid
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(x)[:, self.class_tokens:]
        if self.pixel_shuffle == 1:
            return tokens
        s = self.pixel_shuffle
        return rearrange(tokens, "b (h sh w sw) c -> b (h w) (sh sw c)",
                         h=self.grid // s, sh=s, w=self.grid // s, sw=s)


def layer_spec_and_norm(device: torch.device):
    """Bidirectional pre-norm layer spec and norm class of an encoder: Transformer Engine's on a
    GPU with TE, else megatron-core's local ones (norms checkpointed under TE's names)."""
    if te_available(device):
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.vision.vit_layer_specs import (
            get_vit_layer_with_transformer_engine_spec,
        )

        return get_vit_layer_with_transformer_engine_spec(), TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return local_vit_layer_spec(), WrappedTorchNorm


TE_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
"""Checkpoint keys of the local spec's norms under the names Transformer Engine's fused
LayerNorm-linear layers load them by (megatron-core's local GPT spec carries the same map)."""


def local_vit_layer_spec() -> ModuleSpec:
    """megatron-core's local ViT layer spec, checkpointing its norms under TE's names, so an
    images branch saved on a CPU loads into the GPU build and back (megatron-core's own local ViT
    spec has no keys map, unlike its local GPT spec)."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

    spec = get_vit_layer_with_local_spec()
    return replace(spec, submodules=replace(spec.submodules,
                                            sharded_state_dict_keys_map=dict(TE_NORM_KEYS)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (SigLIP's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}
"""``--encoder-activation`` -> the function megatron-core's MLP applies."""


class NoNorm(torch.nn.Identity):
    """Stands in for the final norm of SigLIP's tower, which LLaVA does not apply to the features
    (its weights stay with the imported files, see ``convert``)."""

    def __init__(self, config=None, hidden_size: int | None = None, eps: float | None = None):
        super().__init__()


def backbone_spec(cfg: ImagesModelConfig, tp: int, pgs: ProcessGroupCollection,
                  device: torch.device, precision: str = "fp32") -> ModuleSpec:
    """The encoder up to its feature layer: our ViT (no class token), CLIP (one class token,
    ``ln_pre``), SigLIP (conv bias, no class token) or RADIO (``class_token_len`` class tokens,
    CPE)."""
    activation = ACTIVATIONS[cfg.activation]
    config = build_transformer_config(
        cfg, tp, device, precision, num_layers=cfg.built_layers, activation_func=activation,
        bias_activation_fusion=device.type == "cuda" and activation is F.gelu)
    layer_spec, norm = layer_spec_and_norm(device)
    common = {"transformer_config": config, "transformer_layer_spec": layer_spec,
              "patch_dim": cfg.patch_size, "img_h": cfg.image_size, "img_w": cfg.image_size,
              "pg_collection": pgs}
    if cfg.kind == "radio":
        return ModuleSpec(module=RADIOViTModel, params={
            **common, "add_class_token": cfg.class_token_len > 0,
            "class_token_len": cfg.class_token_len, "max_img_h": 2 * cfg.image_size,
            "max_img_w": 2 * cfg.image_size, "has_cpe": True})
    if cfg.kind == "siglip":
        return ModuleSpec(module=CLIPViTModel, params={
            **common, "model_subtype": "siglip", "ln_post_impl": NoNorm,
            "add_class_token": False, "class_token_len": 0})
    return ModuleSpec(module=CLIPViTModel, params={
        **common, "ln_pre_impl": norm, "add_class_token": cfg.class_tokens > 0,
        "class_token_len": cfg.class_tokens})


def images_submodule_spec(cfg: ImagesModelConfig, language_hidden_size: int, tp: int,
                          pgs: ProcessGroupCollection, device: torch.device,
                          precision: str = "fp32") -> ModuleSpec:
    """ModuleSpec of the images branch for ``MimoModel`` (encoder + 2-layer MLP projector)."""
    encoder = ModuleSpec(module=PatchTokens, params={
        "backbone": backbone_spec(cfg, tp, pgs, device, precision), "class_tokens": cfg.class_tokens,
        "pixel_shuffle": cfg.pixel_shuffle, "grid": cfg.grid,
        "tp_group": pgs.tp if pgs is not None else None})
    projector = projector_spec(cfg, cfg.projector_input_size, language_hidden_size, tp, pgs,
                               device, precision)
    return ModuleSpec(module=VisionModalitySubmodules,
                      submodules={"encoders": {ENCODER_NAME: encoder}, "input_projections": [projector]},
                      params={"pg_collection": pgs})


def projector_spec(cfg: TransformerSizes, input_size: int, language_hidden_size: int, tp: int,
                   pgs: ProcessGroupCollection | None, device: torch.device,
                   precision: str = "fp32") -> ModuleSpec:
    """An encoder's 2-layer GELU MLP projector (column- then row-parallel) from ``input_size``
    channels into the language hidden size; ``cfg``'s ``projector_ffn`` is its hidden size."""
    config = build_transformer_config(
        TransformerSizes(num_layers=1, hidden_size=language_hidden_size,
                         num_attention_heads=cfg.num_attention_heads,
                         ffn_hidden_size=cfg.projector_ffn),
        tp, device, precision)
    return ModuleSpec(module=MultimodalProjector, params={
        "config": config,
        "submodules": MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        "projector_type": "mlp", "input_size": input_size, "pg_collection": pgs,
    })


def images_inputs(pixels: torch.Tensor) -> dict:
    """``modality_inputs`` entry for a batch of images ``[b, 3, H, W]``."""
    return {ENCODER_NAME: {"x": pixels}}
