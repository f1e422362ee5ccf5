"""Model sections of the config: the image and audio encoders and the language model (no torch
import)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mimo.errors import require as _require
from megatron_mimo.errors import require_positive as _require_positive

IMAGES_KINDS = ("vit", "clip", "siglip", "radio")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")
PIXEL_NORMS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
               "clip": ((0.48145466, 0.4578275, 0.40821073),
                        (0.26862954, 0.26130258, 0.27577711))}
"""(mean, std) per RGB channel of pixels in [0, 1] (``--encoder-pixel-norm``): 'half' maps them
to [-1, 1] (our towers, SigLIP), 'clip' is what OpenAI's CLIP towers were trained on."""
"""MLP activations of the image encoder: exact GELU, CLIP's quick GELU (x * sigmoid(1.702 x)),
SigLIP's tanh-approximated GELU."""
LANGUAGE_KINDS = ("gpt", "mamba_hybrid")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("rope",)
"""Position embeddings of the GPT builder (the Llama family's; others are not tested here)."""
GPT_ONLY_DEFAULTS = {"normalization": "LayerNorm", "swiglu": False, "num_query_groups": None,
                     "disable_bias_linear": False, "position_embedding_type": "rope",
                     "rotary_base": 10000}
"""Language options the Mamba hybrid does not take, with their defaults."""


@dataclass(frozen=True)
class TransformerSizes:
    """Sizes every transformer branch has (the shared part of the two model configs)."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Hidden size."""
    num_attention_heads: int = 4
    """Attention heads."""
    ffn_hidden_size: int = 128
    """MLP hidden size."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm/RMSNorm (pretrained models fix it: CLIP 1e-5, SigLIP and
    Llama 2 1e-6)."""

    def _validate_sizes(self, owner: str, kind: str, kinds: tuple[str, ...], **extra: int) -> None:
        _require(kind in kinds, f"{owner}.kind must be one of {kinds}, got {kind!r}")
        _require_positive(owner, num_layers=self.num_layers, hidden_size=self.hidden_size,
                          num_attention_heads=self.num_attention_heads,
                          ffn_hidden_size=self.ffn_hidden_size, **extra)
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"{owner}.hidden_size {self.hidden_size} must divide by num_attention_heads "
                 f"{self.num_attention_heads}")
        for name in ("hidden_dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0,
                     f"{owner}.{name} must lie in [0, 1), got {getattr(self, name)}")
        _require(0 < self.norm_epsilon < 1, f"{owner}.norm_epsilon must lie in (0, 1), got "
                                            f"{self.norm_epsilon}")


@dataclass(frozen=True)
class ImagesModelConfig(TransformerSizes):
    """Image encoder (ViT or RADIO) and its projector into the language hidden size."""

    kind: str = "vit"
    """Encoder family: 'vit' (CLIP-style ViT without class token), 'clip' (CLIP's vision tower:
    one class token, dropped before the projector), 'siglip' (SigLIP's vision tower) or
    'radio'."""
    image_size: int = 32
    """Square input image side in pixels."""
    patch_size: int = 8
    """Square patch side in pixels."""
    class_token_len: int = 8
    """Class tokens RADIO prepends (dropped before the projector; radio only)."""
    pixel_shuffle: int = 1
    """Merge each SxS block of patch embeddings into one token (S^2 x channels) before the
    projector; RADIO-based VLMs use 2."""
    activation: str = "gelu"
    """MLP activation of the encoder layers: gelu, quick_gelu (OpenAI CLIP) or gelu_tanh
    (SigLIP)."""
    feature_layer: int = -1
    """Encoder layer whose output feeds the projector, counted from the end: -1 the last, -2 the
    penultimate (LLaVA's choice); only the layers up to it are built."""
    pixel_norm: str = "half"
    """Pixel normalisation the encoder expects: 'half' ((x - 0.5) / 0.5) or 'clip' (OpenAI
    CLIP's per-channel mean and std, what its pretrained weights saw)."""
    projector_ffn_hidden_size: int | None = None
    """Hidden size of the 2-layer projector (LLaVA: the language hidden size); None = the
    encoder's ffn_hidden_size."""

    def __post_init__(self) -> None:
        self._validate_sizes("images", self.kind, IMAGES_KINDS, image_size=self.image_size,
                             patch_size=self.patch_size, pixel_shuffle=self.pixel_shuffle)
        _require(self.image_size % self.patch_size == 0,
                 f"images.image_size {self.image_size} must divide by patch_size {self.patch_size}")
        _require((self.image_size // self.patch_size) % self.pixel_shuffle == 0,
                 f"images patch grid {self.image_size // self.patch_size} must divide by "
                 f"pixel_shuffle {self.pixel_shuffle}")
        _require(self.class_token_len >= 0, f"images.class_token_len must be >= 0, got {self.class_token_len}")
        _require(self.activation in ACTIVATIONS, f"images.activation must be one of "
                                                 f"{ACTIVATIONS}, got {self.activation!r}")
        _require(self.pixel_norm in PIXEL_NORMS, f"images.pixel_norm must be one of "
                                                 f"{tuple(PIXEL_NORMS)}, got {self.pixel_norm!r}")
        _require(-self.num_layers <= self.feature_layer <= -1, (
            f"images.feature_layer must lie in [-{self.num_layers}, -1] (counted from the last of "
            f"num_layers {self.num_layers}), got {self.feature_layer}"))
        _require(self.projector_ffn_hidden_size is None or self.projector_ffn_hidden_size >= 1,
                 f"images.projector_ffn_hidden_size must be >= 1, got "
                 f"{self.projector_ffn_hidden_size}")

    @property
    def built_layers(self) -> int:
        """Encoder layers built: those up to ``feature_layer``."""
        return self.num_layers + 1 + self.feature_layer

    @property
    def class_tokens(self) -> int:
        """Leading tokens of the encoder output that are not patches (dropped)."""
        return {"radio": self.class_token_len, "clip": 1}.get(self.kind, 0)

    @property
    def projector_ffn(self) -> int:
        """Hidden size of the projector."""
        return self.projector_ffn_hidden_size or self.ffn_hidden_size

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Embeddings one image contributes to the text sequence (after pixel shuffle)."""
        return (self.grid // self.pixel_shuffle) ** 2

    @property
    def projector_input_size(self) -> int:
        """Channels entering the projector."""
        return self.hidden_size * self.pixel_shuffle ** 2


@dataclass(frozen=True)
class AudioModelConfig(TransformerSizes):
    """Whisper-style audio encoder (log-mel frames -> two 1-D convolutions, the second with
    stride 2 -> position embeddings -> transformer) and its projector into the language hidden
    size. A clip is padded with silence to ``max_frames``: every sample contributes exactly
    ``num_audio_tokens`` embeddings, so every micro-batch has the same shapes on every rank."""

    sample_rate: int = 8000
    """Samples per second of the waveforms the encoder reads (others are an error)."""
    num_mel_bins: int = 32
    """Mel bands of the log-mel features (the first convolution's input channels)."""
    n_fft: int = 256
    """STFT window length in samples (a Hann window)."""
    hop_length: int = 128
    """STFT hop in samples."""
    max_frames: int = 32
    """Log-mel frames of the longest clip the encoder takes (longer clips are an error)."""
    frame_stack: int = 2
    """Consecutive encoder outputs concatenated into one token before the projector."""
    projector_ffn_hidden_size: int | None = None
    """Hidden size of the 2-layer projector; None = the encoder's ffn_hidden_size."""

    def __post_init__(self) -> None:
        self._validate_sizes("audio", "whisper", ("whisper",), sample_rate=self.sample_rate,
                             num_mel_bins=self.num_mel_bins, n_fft=self.n_fft,
                             hop_length=self.hop_length, max_frames=self.max_frames,
                             frame_stack=self.frame_stack)
        _require(self.max_frames % (2 * self.frame_stack) == 0,
                 f"audio.max_frames {self.max_frames} must divide by 2 x frame_stack "
                 f"{self.frame_stack} (the stride-2 convolution, then the stacking)")
        _require(self.num_mel_bins <= self.n_fft // 2 + 1,
                 f"audio.num_mel_bins {self.num_mel_bins} must not exceed the n_fft {self.n_fft} "
                 f"frequency bins ({self.n_fft // 2 + 1})")
        _require(self.projector_ffn_hidden_size is None or self.projector_ffn_hidden_size >= 1,
                 f"audio.projector_ffn_hidden_size must be >= 1, got "
                 f"{self.projector_ffn_hidden_size}")

    @property
    def encoder_frames(self) -> int:
        """Positions of the transformer (after the stride-2 convolution)."""
        return self.max_frames // 2

    @property
    def num_audio_tokens(self) -> int:
        """Embeddings one clip contributes to the text sequence."""
        return self.encoder_frames // self.frame_stack

    @property
    def max_samples(self) -> int:
        """Waveform samples of the longest clip that fits ``max_frames`` (centred STFT frames)."""
        return (self.max_frames - 1) * self.hop_length

    @property
    def projector_ffn(self) -> int:
        """Hidden size of the projector."""
        return self.projector_ffn_hidden_size or self.ffn_hidden_size

    @property
    def projector_input_size(self) -> int:
        """Channels entering the projector."""
        return self.hidden_size * self.frame_stack


@dataclass(frozen=True)
class LanguageModelConfig(TransformerSizes):
    """Language model (GPT or Mamba hybrid) and the text sequence it reads."""

    kind: str = "gpt"
    """Language family: 'gpt' or 'mamba_hybrid'."""
    vocab_size: int = 256
    """Vocabulary size of the model (an imported one is padded to a multiple of 128)."""
    image_token: int | None = None
    """Token id that marks where image embeddings go (LLaVA: the tokenizer's '<image>');
    None = vocab_size - 1."""
    audio_token: int | None = None
    """Token id that marks where audio embeddings go (with an audio branch); None =
    vocab_size - 2."""
    seq_length: int = 48
    """Tokens per sample, image and audio placeholder tokens included."""
    hybrid_pattern: str = "M*M-"
    """Mamba-hybrid layer pattern: M = Mamba, * = attention, - = MLP (mamba_hybrid only)."""
    mamba_state_dim: int = 16
    """SSM state size of every Mamba layer (mamba_hybrid only)."""
    mamba_head_dim: int = 16
    """Channels per Mamba head; heads = 2 x hidden_size / mamba_head_dim (mamba_hybrid only)."""
    mamba_num_groups: int = 2
    """B/C groups of every Mamba layer; must divide by the language TP (mamba_hybrid only)."""
    normalization: str = "LayerNorm"
    """'LayerNorm' or 'RMSNorm' (Llama) (gpt only: the hybrid always uses RMSNorm)."""
    swiglu: bool = False
    """SwiGLU MLP (Llama): fc1 holds [gate; up] and the MLP computes silu(gate) * up (gpt only)."""
    num_query_groups: int | None = None
    """Key/value heads of grouped-query attention; must divide the attention heads and by the
    language TP (gpt only; default: one per attention head)."""
    disable_bias_linear: bool = False
    """No biases in the linear layers (Llama) (gpt only)."""
    position_embedding_type: str = "rope"
    """'rope' (rotary; the only one the GPT builder takes) (gpt only)."""
    rotary_base: int = 10000
    """RoPE base theta (Llama 2: 10000, Llama 3: 500000) (gpt only)."""
    untie_embeddings_and_output_weights: bool = False
    """The output layer has its own weights (Llama, Vicuna); without it the output layer
    reuses the word embeddings, which needs one language pipeline stage."""

    def __post_init__(self) -> None:
        self._validate_sizes("language", self.kind, LANGUAGE_KINDS, vocab_size=self.vocab_size,
                             seq_length=self.seq_length, mamba_state_dim=self.mamba_state_dim,
                             mamba_head_dim=self.mamba_head_dim,
                             mamba_num_groups=self.mamba_num_groups)
        _require(set(self.hybrid_pattern) <= set("M*-") and self.hybrid_pattern != "",
                 f"language.hybrid_pattern may hold only 'M', '*', '-', got {self.hybrid_pattern!r}")
        self._validate_gpt_options()
        _require(self.image_token is None or 0 <= self.image_token < self.vocab_size,
                 f"language.image_token {self.image_token} must lie in [0, vocab_size "
                 f"{self.vocab_size})")
        _require(self.audio_token is None or 0 <= self.audio_token < self.vocab_size,
                 f"language.audio_token {self.audio_token} must lie in [0, vocab_size "
                 f"{self.vocab_size})")
        if self.kind == "mamba_hybrid":
            _require(len(self.hybrid_pattern) == self.num_layers, (
                f"language.hybrid_pattern {self.hybrid_pattern!r} has {len(self.hybrid_pattern)} "
                f"layers but num_layers is {self.num_layers}"))
            heads = 2 * self.hidden_size // self.mamba_head_dim
            _require(2 * self.hidden_size % self.mamba_head_dim == 0 and heads % self.mamba_num_groups == 0,
                     f"mamba heads (2 x hidden_size {self.hidden_size} / mamba_head_dim "
                     f"{self.mamba_head_dim}) must be whole and divide by mamba_num_groups "
                     f"{self.mamba_num_groups}")

    def _validate_gpt_options(self) -> None:
        _require(self.normalization in NORMALIZATIONS, f"language.normalization must be one of "
                 f"{NORMALIZATIONS}, got {self.normalization!r}")
        _require(self.position_embedding_type in POSITION_EMBEDDINGS,
                 f"language.position_embedding_type must be one of {POSITION_EMBEDDINGS}, got "
                 f"{self.position_embedding_type!r}")
        _require_positive("language", rotary_base=self.rotary_base)
        groups = self.num_query_groups
        if groups is not None:
            _require(groups > 0 and self.num_attention_heads % groups == 0,
                     f"language.num_query_groups {groups} must divide num_attention_heads "
                     f"{self.num_attention_heads}")
        if self.kind != "gpt":
            for name, default in GPT_ONLY_DEFAULTS.items():
                _require(getattr(self, name) == default, f"language.{name} applies to the GPT "
                                                         f"language model only, not to {self.kind}")

    @property
    def query_groups(self) -> int:
        """Key/value heads (``num_query_groups``, or one per attention head)."""
        return self.num_query_groups or self.num_attention_heads

    def stage_patterns(self, num_stages: int) -> list[str]:
        """The hybrid pattern cut into ``num_stages`` equal segments, one per pipeline stage
        (``'M*M-'``, 2 -> ``['M*', 'M-']``); the split is validated with the layout."""
        size = len(self.hybrid_pattern) // num_stages
        return [self.hybrid_pattern[i:i + size] for i in range(0, len(self.hybrid_pattern), size)]

    @property
    def mamba_num_heads(self) -> int:
        """Heads of every Mamba mixer (expand 2)."""
        return 2 * self.hidden_size // self.mamba_head_dim

    @property
    def image_token_id(self) -> int:
        """Token id that marks where image embeddings go."""
        return self.vocab_size - 1 if self.image_token is None else self.image_token

    @property
    def audio_token_id(self) -> int:
        """Token id that marks where audio embeddings go."""
        return self.vocab_size - 2 if self.audio_token is None else self.audio_token
