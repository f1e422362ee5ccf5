"""What fits before launch: parameters per rank of each branch and the bytes of weights,
gradients, fp32 main parameters and Adam moments in the chosen precision (pure arithmetic on the
config; megatron-core's local layer specs, TP-sharded as megatron-core shards them)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mimo.config.layout import AUDIO, IMAGES, LANGUAGE
from megatron_mimo.config.models import AudioModelConfig, ImagesModelConfig, LanguageModelConfig
from megatron_mimo.config.schema import MimoConfig

MAMBA_CONV_KERNEL = 4
"""megatron-core's Mamba ``d_conv``."""


def _norm(hidden: int, bias: bool) -> int:
    return hidden * (2 if bias else 1)


def _attention(hidden: int, tp: int, bias: bool, qkv: int | None = None,
               linear_bias: bool = True) -> int:
    """Input norm (``bias``: LayerNorm, else RMSNorm), QKV with ``qkv`` outputs (default
    ``3 * hidden``; fewer with grouped-query attention) and output projection; column-parallel
    biases split, row-parallel ones replicated, none without ``linear_bias``."""
    qkv = 3 * hidden if qkv is None else qkv
    return (_norm(hidden, bias) + qkv * hidden // tp + hidden * hidden // tp
            + linear_bias * (qkv // tp + hidden))


def _mlp(hidden: int, ffn: int, tp: int, input_size: int | None = None, gated: bool = False,
         linear_bias: bool = True) -> int:
    """fc1 (column-parallel; ``[gate; up]``, twice as wide, when ``gated``) and fc2
    (row-parallel); column-parallel biases split, row-parallel ones replicated."""
    inputs = hidden if input_size is None else input_size
    fc1 = ffn * (2 if gated else 1)
    return fc1 * inputs // tp + hidden * ffn // tp + linear_bias * (fc1 // tp + hidden)


def _transformer_layer(hidden: int, ffn: int, tp: int) -> int:
    return _attention(hidden, tp, bias=True) + _norm(hidden, True) + _mlp(hidden, ffn, tp)


def _mamba_layer(cfg: LanguageModelConfig, tp: int) -> int:
    hidden, groups_state = cfg.hidden_size, 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
    inner, heads = 2 * hidden, cfg.mamba_num_heads
    conv_channels = (inner + groups_state) // tp
    return (hidden  # the layer's norm
            + (2 * inner + groups_state + heads) // tp * hidden  # in_proj
            + conv_channels * (MAMBA_CONV_KERNEL + 1)  # conv1d weight and bias
            + 3 * heads // tp  # dt_bias, A_log, D
            + inner // tp  # gated norm
            + hidden * inner // tp)  # out_proj


def _gpt_layer(cfg: LanguageModelConfig, tp: int) -> int:
    """One GPT-family layer: norms (LayerNorm with bias, or RMSNorm), attention with
    ``query_groups`` key/value heads, the MLP (SwiGLU: ``[gate; up]``), biases unless
    ``disable_bias_linear``."""
    hidden, layernorm, bias = cfg.hidden_size, cfg.normalization == "LayerNorm", \
        not cfg.disable_bias_linear
    qkv = (cfg.num_attention_heads + 2 * cfg.query_groups) * (hidden // cfg.num_attention_heads)
    return (_attention(hidden, tp, layernorm, qkv, bias) + _norm(hidden, layernorm)
            + _mlp(hidden, cfg.ffn_hidden_size, tp, gated=cfg.swiglu, linear_bias=bias))


def language_parameters(cfg: LanguageModelConfig, tp: int, pp: int = 1, stage: int = 0) -> int:
    """Parameters on one rank of pipeline stage ``stage`` (of ``pp``) of the language branch
    (GPT or Mamba hybrid) at ``tp``: its share of the layers, the word embeddings on the first
    stage, the final norm and the output layer (unless it reuses the embeddings) on the last."""
    hidden = cfg.hidden_size
    first, last = stage == 0, stage == pp - 1
    untied = cfg.untie_embeddings_and_output_weights
    total = (first + last * untied) * (cfg.vocab_size // tp * hidden)
    if cfg.kind == "gpt":
        return (total + cfg.num_layers // pp * _gpt_layer(cfg, tp)
                + last * _norm(hidden, cfg.normalization == "LayerNorm"))
    for symbol in cfg.stage_patterns(pp)[stage]:
        if symbol == "M":
            total += _mamba_layer(cfg, tp)
        elif symbol == "*":
            total += _attention(hidden, tp, bias=False)  # RMSNorm: weight only
        else:
            total += hidden + _mlp(hidden, cfg.ffn_hidden_size, tp)  # RMSNorm + MLP
    return total + last * hidden  # final RMSNorm


def images_parameters(cfg: ImagesModelConfig, language_hidden: int, tp: int) -> int:
    """Parameters on one rank of the images branch (the encoder's layers up to its feature layer
    + MLP projector) at ``tp``."""
    hidden, patch = cfg.hidden_size, cfg.patch_size
    layers = cfg.built_layers * _transformer_layer(hidden, cfg.ffn_hidden_size, tp)
    if cfg.kind == "radio":
        positions = (2 * cfg.image_size // patch) ** 2  # RADIO's position grid covers 2x the image
        # RADIO's patch embedder is a column-parallel linear (no bias): split over TP
        stem = cfg.class_token_len * hidden + positions * hidden + 3 * patch * patch * hidden // tp
    else:
        tokens = cfg.grid ** 2 + cfg.class_tokens
        conv_bias = hidden if cfg.kind == "siglip" else 0  # SigLIP: conv bias, no ln_pre
        ln_pre = 0 if cfg.kind == "siglip" else _norm(hidden, True)
        stem = (ln_pre + 3 * patch * patch * hidden + conv_bias + tokens * hidden
                + cfg.class_tokens * hidden)
    return stem + layers + projector_parameters(cfg, language_hidden, tp)


def projector_parameters(cfg: ImagesModelConfig, language_hidden: int, tp: int) -> int:
    """Parameters of the images branch's MLP projector on one rank at ``tp``."""
    return _mlp(language_hidden, cfg.projector_ffn, tp, cfg.projector_input_size)


def audio_parameters(cfg: AudioModelConfig, language_hidden: int, tp: int) -> int:
    """Parameters on one rank of the audio branch at ``tp``: the two convolutions, position
    embeddings and final norm (replicated), the transformer layers and the MLP projector."""
    hidden = cfg.hidden_size
    stem = (cfg.num_mel_bins * hidden * 3 + hidden) + (hidden * hidden * 3 + hidden)
    stem += cfg.encoder_frames * hidden + _norm(hidden, True)
    layers = cfg.num_layers * _transformer_layer(hidden, cfg.ffn_hidden_size, tp)
    return stem + layers + audio_projector_parameters(cfg, language_hidden, tp)


def audio_projector_parameters(cfg: AudioModelConfig, language_hidden: int, tp: int) -> int:
    """Parameters of the audio branch's MLP projector on one rank at ``tp``."""
    return _mlp(language_hidden, cfg.projector_ffn, tp, cfg.projector_input_size)


@dataclass(frozen=True)
class RankMemory:
    """Per-rank parameters and bytes of one branch (every rank of a branch holds the same)."""

    branch: str
    parameters: int
    weights: int
    grads: int
    main_params: int
    adam: int

    @property
    def total(self) -> int:
        """Bytes of model and optimizer state (activations not included)."""
        return self.weights + self.grads + self.main_params + self.adam


def branch_parameters(cfg: MimoConfig, branch: str, stage: int = 0) -> int:
    """Parameters on one rank of pipeline stage ``stage`` of ``branch``."""
    layout = cfg.parallel(branch)
    if branch == IMAGES:
        return images_parameters(cfg.images, cfg.language.hidden_size, layout.tp)
    if branch == AUDIO:
        return audio_parameters(cfg.audio, cfg.language.hidden_size, layout.tp)
    return language_parameters(cfg.language, layout.tp, layout.pp, stage)


def trainable_parameters(cfg: MimoConfig, branch: str, stage: int = 0) -> int:
    """Parameters of one rank that train (``--freeze-*`` leaves the others without gradient,
    main parameter or Adam moments)."""
    training = cfg.training
    if branch == LANGUAGE:
        return 0 if training.freeze_lm else branch_parameters(cfg, branch, stage)
    if branch == AUDIO:
        return 0 if training.freeze_audio else branch_parameters(cfg, branch)
    tp = cfg.parallel(branch).tp
    projector = projector_parameters(cfg.images, cfg.language.hidden_size, tp)
    encoder = branch_parameters(cfg, branch) - projector
    return (0 if training.freeze_vit else encoder) + (0 if training.freeze_projection else projector)


def rank_memory(cfg: MimoConfig, branch: str, stage: int = 0) -> RankMemory:
    """Memory of one rank of ``branch`` (at pipeline stage ``stage``): 16-bit training keeps fp32
    main params; the distributed optimizer shards main params and Adam moments over the
    branch's DP ranks; frozen parameters have weights only."""
    params, dp = branch_parameters(cfg, branch, stage), cfg.parallel(branch).dp
    trained = trainable_parameters(cfg, branch, stage)
    precision = cfg.precision
    weight_bytes = 4 if precision.name == "fp32" else 2
    grad_bytes = 4 if precision.grads_in_fp32 else 2
    main = 4 * trained // dp if precision.name != "fp32" else 0
    return RankMemory(branch, params, params * weight_bytes, trained * grad_bytes, main,
                      8 * trained // dp)


def format_memory(cfg: MimoConfig) -> str:
    """Dry-run lines: parameters and GiB per rank of each branch."""
    gib = float(1 << 30)
    lines = [f"  memory per rank ({cfg.precision.name}, model and optimizer state, no activations):"]
    for branch, stage in _branch_stages(cfg):
        m = rank_memory(cfg, branch, stage)
        name = branch if cfg.parallel(branch).pp == 1 else f"{branch} stage {stage}"
        lines.append(
            f"    {name}: {m.parameters:,} parameters; weights {m.weights / gib:.2f} GiB, grads "
            f"{m.grads / gib:.2f} GiB, fp32 main params {m.main_params / gib:.2f} GiB, Adam "
            f"{m.adam / gib:.2f} GiB, total {m.total / gib:.2f} GiB")
    return "\n".join(lines)


def _branch_stages(cfg: MimoConfig) -> list[tuple[str, int]]:
    return [(branch, stage) for branch in cfg.branches
            for stage in range(cfg.parallel(branch).pp)]
