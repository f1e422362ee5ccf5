"""Which Hugging Face tensors make which parameter of ours, and how.

Hugging Face names are used here in a canonical form, one prefix per part whatever the
transformers version wrote (:mod:`megatron_mimo.convert.hf_files` maps them):
``vision.`` (the tower), ``projector.``, ``text.`` (the LLM body) and ``lm_head.``. Our names are
those of the one-process ``MimoModel`` (:mod:`megatron_mimo.convert.single`) at TP1.

Layouts that must stay exactly as megatron-core computes with them (a test breaks each):

- ``linear_qkv`` interleaves per key/value group: the group's query heads, then its key head,
  then its value head (``qkv``); HF keeps ``q_proj``/``k_proj``/``v_proj`` apart.
- SwiGLU's ``linear_fc1`` stacks ``[gate; up]`` along the output rows (``gated``).
- The vocabulary is padded with zero rows to a multiple of 128 (``vocab``); export strips them.
- CLIP's class embedding ``[h]`` is megatron-core's ``class_token`` ``[1, 1, h]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mimo.config.schema import MimoConfig

VISION = "modality_submodules.images.encoders.vit.backbone."
PROJECTOR = "modality_submodules.images.input_projections.0.encoder."
LANGUAGE = "language_model."


COMBINED = ("qkv", "gated", "vocab")
"""Rule kinds whose parameter is a new tensor built from the HF ones (the others are them)."""


@dataclass(frozen=True)
class Rule:
    """One parameter of ours and the HF tensors it is made of."""

    ours: str
    hf: tuple[str, ...]
    kind: str = "copy"
    """copy, qkv, gated, vocab or class_token."""
    branch: str = "language"
    """Whose head counts a ``qkv`` rule uses: 'images' or 'language'."""


@dataclass(frozen=True)
class Heads:
    """Attention shape a ``qkv`` rule needs."""

    heads: int
    groups: int


def _pair(ours: str, hf: str, names: tuple[str, ...] = ("weight", "bias")) -> list[Rule]:
    return [Rule(f"{ours}.{n}", (f"{hf}.{n}",)) for n in names]


def _vision_layer(i: int) -> list[Rule]:
    ours, hf = f"{VISION}decoder.layers.{i}.", f"vision.encoder.layers.{i}."
    attn = [Rule(f"{ours}self_attention.linear_qkv.{n}",
                 tuple(f"{hf}self_attn.{p}_proj.{n}" for p in "qkv"), "qkv", "images")
            for n in ("weight", "bias")]
    return (_pair(f"{ours}input_layernorm", f"{hf}layer_norm1") + attn
            + _pair(f"{ours}self_attention.linear_proj", f"{hf}self_attn.out_proj")
            + _pair(f"{ours}pre_mlp_layernorm", f"{hf}layer_norm2")
            + _pair(f"{ours}mlp.linear_fc1", f"{hf}mlp.fc1")
            + _pair(f"{ours}mlp.linear_fc2", f"{hf}mlp.fc2"))


def vision_rules(cfg: MimoConfig) -> list[Rule]:
    """The tower up to its feature layer, and the projector."""
    kind = cfg.images.kind
    rules = [Rule(f"{VISION}conv1.weight", ("vision.embeddings.patch_embedding.weight",)),
             Rule(f"{VISION}position_embeddings.weight",
                  ("vision.embeddings.position_embedding.weight",))]
    if kind == "siglip":
        rules.append(Rule(f"{VISION}conv1.bias", ("vision.embeddings.patch_embedding.bias",)))
    else:
        rules += [Rule(f"{VISION}class_token", ("vision.embeddings.class_embedding",),
                       "class_token")]
        rules += _pair(f"{VISION}ln_pre", "vision.pre_layrnorm")
    for i in range(cfg.images.built_layers):
        rules += _vision_layer(i)
    return (rules + _pair(f"{PROJECTOR}linear_fc1", "projector.linear_1")
            + _pair(f"{PROJECTOR}linear_fc2", "projector.linear_2"))


def _language_layer(i: int) -> list[Rule]:
    ours, hf = f"{LANGUAGE}decoder.layers.{i}.", f"text.layers.{i}."
    return [
        Rule(f"{ours}input_layernorm.weight", (f"{hf}input_layernorm.weight",)),
        Rule(f"{ours}self_attention.linear_qkv.weight",
             tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
        Rule(f"{ours}self_attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",)),
        Rule(f"{ours}pre_mlp_layernorm.weight", (f"{hf}post_attention_layernorm.weight",)),
        Rule(f"{ours}mlp.linear_fc1.weight",
             (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), "gated"),
        Rule(f"{ours}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",)),
    ]


def language_rules(cfg: MimoConfig) -> list[Rule]:
    """The Llama-family LLM: embeddings, layers, final norm, output layer (untied)."""
    rules = [Rule(f"{LANGUAGE}embedding.word_embeddings.weight", ("text.embed_tokens.weight",),
                  "vocab")]
    for i in range(cfg.language.num_layers):
        rules += _language_layer(i)
    rules.append(Rule(f"{LANGUAGE}decoder.final_layernorm.weight", ("text.norm.weight",)))
    if cfg.language.untie_embeddings_and_output_weights:
        rules.append(Rule(f"{LANGUAGE}output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def rules_for(cfg: MimoConfig) -> list[Rule]:
    """Every rule of the model ``cfg`` describes (a LLaVA: CLIP/SigLIP tower + Llama)."""
    return vision_rules(cfg) + language_rules(cfg)


def heads_of(cfg: MimoConfig, branch: str) -> Heads:
    """Query heads and key/value groups of a branch's attention."""
    if branch == "images":
        return Heads(cfg.images.num_attention_heads, cfg.images.num_attention_heads)
    return Heads(cfg.language.num_attention_heads, cfg.language.query_groups)


def padded_vocab(vocab: int, multiple: int = 128) -> int:
    """``vocab`` rounded up to a multiple of ``multiple`` (megatron-core shards the vocabulary
    over TP: 128 divides by every power-of-two TP up to 128)."""
    return -(-vocab // multiple) * multiple


def to_ours(rule: Rule, tensors: list[torch.Tensor], heads: Heads, vocab: int) -> torch.Tensor:
    """Our parameter from the HF tensors of ``rule`` (``vocab``: our padded vocabulary)."""
    if rule.kind == "qkv":
        q, k, v = (t.reshape(heads.groups, -1, *t.shape[1:]) for t in tensors)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tensors[0].shape[1:])
    if rule.kind == "gated":
        return torch.cat(tensors, dim=0)
    (tensor,) = tensors
    if rule.kind == "vocab":
        pad = tensor.new_zeros(vocab - tensor.shape[0], *tensor.shape[1:])
        return torch.cat([tensor, pad], dim=0)
    if rule.kind == "class_token":
        return tensor.reshape(1, 1, -1)
    return tensor


def to_hf(rule: Rule, tensor: torch.Tensor, heads: Heads, vocab: int) -> list[torch.Tensor]:
    """The HF tensors of ``rule`` from our parameter (``vocab``: the real vocabulary)."""
    if rule.kind == "qkv":
        rest = tensor.shape[1:]
        grouped = tensor.reshape(heads.groups, -1, *rest)
        head_dim = grouped.shape[1] // (heads.heads // heads.groups + 2)
        sizes = [grouped.shape[1] - 2 * head_dim, head_dim, head_dim]
        return [part.reshape(-1, *rest) for part in torch.split(grouped, sizes, dim=1)]
    if rule.kind == "gated":
        return list(torch.chunk(tensor, 2, dim=0))
    if rule.kind == "vocab":
        return [tensor[:vocab]]
    if rule.kind == "class_token":
        return [tensor.reshape(-1)]
    return [tensor]
