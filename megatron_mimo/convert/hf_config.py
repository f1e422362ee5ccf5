"""Hugging Face ``config.json`` -> our model configs, for the models the converter handles: a
LLaVA (``LlavaForConditionalGeneration``) made of a CLIP or SigLIP vision tower, LLaVA's 2-layer
GELU projector and a Llama-family LLM. Anything else is refused in one line naming the field, so
a model we would compute differently never imports silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_mimo.config.models import ImagesModelConfig, LanguageModelConfig
from megatron_mimo.convert.rules import padded_vocab
from megatron_mimo.errors import ConvertError

LLAVA = "LlavaForConditionalGeneration"
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
SELECT_STRATEGY = {"clip": "default", "siglip": "full"}
"""LLaVA's feature selection each tower is imported with: CLIP's class token is dropped
('default'), SigLIP has none to drop ('full')."""
TEXT_TYPES = ("llama",)


def read_config(directory: Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict (one-line error naming the file)."""
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConvertError(f"{path}: cannot read the Hugging Face config ({error})") from None


def _need(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConvertError(f"{where}: {message}")


def vision_section(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The vision config of a CLIP/SigLIP model file or of a LLaVA's ``vision_config``."""
    if config.get("model_type") in ("clip", "siglip") and "vision_config" in config:
        kind = config["model_type"] + "_vision_model"
        config = {"model_type": kind, **config["vision_config"]}
    _need(config.get("model_type") in VISION_TYPES, where,
          f"vision model_type {config.get('model_type')!r} is not one of {sorted(VISION_TYPES)}")
    return config


def images_config(vision: dict[str, Any], feature_layer: int, select: str, where: str,
                  language_hidden: int) -> ImagesModelConfig:
    """The tower as our images branch, cut at LLaVA's feature layer."""
    kind = VISION_TYPES[vision["model_type"]]
    act = vision.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")
    _need(act in ACTIVATIONS, where, f"vision hidden_act {act!r} is not one of {sorted(ACTIVATIONS)}")
    _need(select == SELECT_STRATEGY[kind], where,
          f"vision_feature_select_strategy {select!r}: a {kind} tower is imported with "
          f"{SELECT_STRATEGY[kind]!r}")
    layers = vision["num_hidden_layers"]
    _need(isinstance(feature_layer, int), where,
          f"vision_feature_layer {feature_layer!r}: only one layer is supported")
    if feature_layer >= 0:  # HF hidden_states index: 0 is the embeddings, k the k-th layer
        _need(feature_layer >= 1, where, "vision_feature_layer 0 (the embeddings) is not supported")
        feature_layer -= layers + 1
    return ImagesModelConfig(
        kind=kind, num_layers=layers, hidden_size=vision["hidden_size"],
        num_attention_heads=vision["num_attention_heads"],
        ffn_hidden_size=vision["intermediate_size"], image_size=vision["image_size"],
        patch_size=vision["patch_size"], class_token_len=0, activation=ACTIVATIONS[act],
        norm_epsilon=vision.get("layer_norm_eps", 1e-5), feature_layer=feature_layer,
        pixel_norm="clip" if kind == "clip" else "half",
        projector_ffn_hidden_size=language_hidden)


def rope_theta(text: dict[str, Any], where: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``; scaled RoPE types
    are refused (megatron-core computes them differently)."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    _need(kind == "default", where, f"rope_type {kind!r} is not supported (only 'default')")
    return params.get("rope_theta", text.get("rope_theta", 10000.0))


def language_config(text: dict[str, Any], where: str, image_token: int) -> LanguageModelConfig:
    """The Llama-family LLM as our GPT language model (vocabulary padded to 128)."""
    _need(text.get("model_type") in TEXT_TYPES, where,
          f"text model_type {text.get('model_type')!r} is not one of {list(TEXT_TYPES)}")
    _need(text.get("hidden_act", "silu") == "silu", where, "text hidden_act must be 'silu'")
    _need(not text.get("attention_bias") and not text.get("mlp_bias"), where,
          "attention_bias / mlp_bias are not supported (Llama has none)")
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    _need(head_dim * heads == hidden, where,
          f"head_dim {head_dim} x num_attention_heads {heads} must equal hidden_size {hidden}")
    theta = rope_theta(text, where)
    _need(float(theta).is_integer(), where, f"rope_theta {theta} must be a whole number")
    return LanguageModelConfig(
        kind="gpt", num_layers=text["num_hidden_layers"], hidden_size=hidden,
        num_attention_heads=heads, ffn_hidden_size=text["intermediate_size"],
        vocab_size=padded_vocab(text["vocab_size"]), image_token=image_token,
        seq_length=text.get("max_position_embeddings", 2048), normalization="RMSNorm",
        swiglu=True, num_query_groups=text.get("num_key_value_heads") or heads,
        disable_bias_linear=True, rotary_base=int(theta),
        norm_epsilon=text.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not text.get("tie_word_embeddings", False))


def image_token_of(llava: dict[str, Any], where: str) -> int:
    """The image token id of a LLaVA config (``image_token_id`` or the older
    ``image_token_index``)."""
    token = llava.get("image_token_id", llava.get("image_token_index"))
    _need(isinstance(token, int), where, "no image_token_id / image_token_index")
    return token


def model_configs(llava: dict[str, Any], where: str
                  ) -> tuple[ImagesModelConfig, LanguageModelConfig]:
    """Our images and language configs of a LLaVA config."""
    architectures = llava.get("architectures") or [llava.get("model_type")]
    _need(LLAVA in architectures, where,
          f"architecture {architectures} is not {LLAVA} (import a LLaVA directory, or a vision "
          f"and an LLM directory with --vision and --language)")
    _need(llava.get("projector_hidden_act", "gelu") == "gelu", where,
          "projector_hidden_act must be 'gelu'")
    _need(llava.get("multimodal_projector_bias", True), where, "a projector without bias is "
                                                               "not supported")
    text = llava["text_config"]
    if "tie_word_embeddings" in llava:
        text = {**text, "tie_word_embeddings": llava["tie_word_embeddings"]}
    language = language_config(text, where, image_token_of(llava, where))
    images = images_config(vision_section(llava["vision_config"], where),
                           llava.get("vision_feature_layer", -2),
                           llava.get("vision_feature_select_strategy", "default"), where,
                           language.hidden_size)
    return images, language


def llava_config(vision: dict[str, Any], text: dict[str, Any], image_token: int,
                 feature_layer: int = -2) -> dict[str, Any]:
    """The LLaVA config of a separate vision model and LLM (what an export writes for them)."""
    kind = VISION_TYPES[vision["model_type"]]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return {"architectures": [LLAVA], "model_type": "llava", "vision_config": vision,
            "text_config": text, "image_token_id": image_token,
            "vision_feature_layer": feature_layer,
            "vision_feature_select_strategy": SELECT_STRATEGY[kind],
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "image_seq_length": tokens,
            "tie_word_embeddings": text.get("tie_word_embeddings", False)}
