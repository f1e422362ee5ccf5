"""Config presets, chosen with ``--config NAME``; flags then override single fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from megatron_mimo.config.layout import ParallelismConfig
from megatron_mimo.config.models import AudioModelConfig, ImagesModelConfig, LanguageModelConfig
from megatron_mimo.config.precision import PrecisionConfig
from megatron_mimo.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MimoConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)
from megatron_mimo.errors import ConfigError


def tiny_cpu() -> MimoConfig:
    """4 CPU ranks: images TP1xDP2 on ranks 0-1, language TP2xDP1 on ranks 2-3; trains in minutes."""
    return MimoConfig(
        name="tiny_cpu",
        images_parallel=ParallelismConfig(tp=1, dp=2, offset=0),
        language_parallel=ParallelismConfig(tp=2, dp=1, offset=2),
        images=ImagesModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                   ffn_hidden_size=128, image_size=32, patch_size=8),
        language=LanguageModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                     ffn_hidden_size=128, vocab_size=256, seq_length=48,
                                     untie_embeddings_and_output_weights=True),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, images_lr=1e-3, images_min_lr=1e-4),
        scheduler=SchedulerConfig(lr_warmup_iters=5, lr_decay_style="cosine"),
        training=TrainingConfig(micro_batch_size=2, global_batch_size=8, train_iters=40, seed=1234),
        logging=LoggingConfig(log_interval=5),
    )


def tiny_cpu_pp() -> MimoConfig:
    """4 CPU ranks: images TP1xDP2 on ranks 0-1, a 4-layer GPT over 2 pipeline stages (TP1xDP1xPP2)
    on ranks 2-3, run by megatron-core's 1F1B schedule over 4 micro-batches."""
    base = tiny_cpu()
    return replace(base, name="tiny_cpu_pp",
                   language_parallel=ParallelismConfig(tp=1, dp=1, pp=2, offset=2),
                   language=replace(base.language, num_layers=4))


DIGITS_PATH = "data/digits"
"""Where `make train` prepares scikit-learn's digits (git-ignored)."""


def digits_cpu() -> MimoConfig:
    """`make train`: tiny_cpu's layout and models trained on real digits (data/digits); the
    caption names the digit, so the held-out accuracy proves the image gets through. The promise
    is >= 90 % on any CPU; the recipe keeps a margin over it (matmul kernels, hence the exact
    numbers, differ between CPU models): one micro-batch per step (the cheapest step on a CPU),
    800 steps, an LR low enough that the accuracy plateaus well before the end."""
    base = tiny_cpu()
    return replace(
        base, name="digits_cpu",
        data=DataConfig(data_path=DIGITS_PATH),
        optimizer=OptimizerConfig(lr=2e-3, min_lr=1e-4, images_lr=2e-3, images_min_lr=1e-4),
        scheduler=SchedulerConfig(lr_warmup_iters=20, lr_decay_style="cosine"),
        training=TrainingConfig(micro_batch_size=32, global_batch_size=32, train_iters=800,
                                seed=1234, eval_interval=800, eval_iters=9),
        logging=LoggingConfig(log_interval=50),
    )


AV_DIGITS_PATH = "data/digits-av"
"""Where `make train CONFIG=tiny_cpu_av` prepares digit images paired with DTMF tones."""


def tiny_cpu_av() -> MimoConfig:
    """4 CPU ranks, three branches: images on rank 0, audio (Whisper-style) on rank 1, language
    TP2 on ranks 2-3; trained on digit images paired with the DTMF tone of another digit
    (data/digits-av), captioned "image seven tone three": both answers need their own branch."""
    base = digits_cpu()
    return replace(
        base, name="tiny_cpu_av",
        images_parallel=ParallelismConfig(tp=1, dp=1, offset=0),
        audio_parallel=ParallelismConfig(tp=1, dp=1, offset=1),
        audio=AudioModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               ffn_hidden_size=128),
        data=DataConfig(data_path=AV_DIGITS_PATH),
        optimizer=replace(base.optimizer, audio_lr=2e-3, audio_min_lr=1e-4),
    )


TINY_LLAVA = "runs/tiny-llava"
"""Where `make train CONFIG=llava_digits_cpu` writes a tiny random Hugging Face LLaVA
(``hf/``) and imports it (``ckpt/``)."""
LLAVA_DIGITS = "runs/llava-digits/ckpt"
"""Where it saves (and resumes from: a run stopped early goes on where it stopped)."""


def llava_digits_cpu() -> MimoConfig:
    """`make train CONFIG=llava_digits_cpu`: digits_cpu's recipe, starting from an imported
    Hugging Face LLaVA (CLIP tower, Llama LLM) with its own tokenizer, the way a pretrained model
    is fine-tuned. The model comes from the checkpoint; the sections here describe the tiny one
    for ``--dry-run`` before it is imported."""
    base = digits_cpu()
    return replace(
        base, name="llava_digits_cpu",
        images=ImagesModelConfig(kind="clip", num_layers=3, hidden_size=64, num_attention_heads=4,
                                 ffn_hidden_size=128, image_size=32, patch_size=8,
                                 activation="quick_gelu", feature_layer=-2, pixel_norm="clip",
                                 projector_ffn_hidden_size=64),
        language=LanguageModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                     ffn_hidden_size=128, vocab_size=128, image_token=4,
                                     seq_length=48, normalization="RMSNorm", swiglu=True,
                                     num_query_groups=2, disable_bias_linear=True,
                                     norm_epsilon=1e-6, untie_embeddings_and_output_weights=True),
        data=replace(base.data, tokenizer_model=f"{TINY_LLAVA}/ckpt/hf"),
        checkpoint=CheckpointConfig(pretrained_checkpoint=f"{TINY_LLAVA}/ckpt",
                                    load=LLAVA_DIGITS, save=LLAVA_DIGITS, save_interval=200),
        training=replace(base.training, eval_interval=200),
    )


def llava_8gpu() -> MimoConfig:
    """8 GPUs, LLaVA-1.5-like: CLIP ViT-L/14-336 (features of its penultimate layer) at TP2xDP2
    on ranks 0-3, a Llama-2/Vicuna-7B shaped
    LLM (RMSNorm, SwiGLU, RoPE, no biases, untied output layer) at TP4 on ranks 4-7."""
    return MimoConfig(
        name="llava_8gpu",
        images_parallel=ParallelismConfig(tp=2, dp=2, offset=0),
        language_parallel=ParallelismConfig(tp=4, dp=1, offset=4),
        images=ImagesModelConfig(kind="clip", num_layers=24, hidden_size=1024,
                                 num_attention_heads=16, ffn_hidden_size=4096, image_size=336,
                                 patch_size=14, activation="quick_gelu", feature_layer=-2,
                                 pixel_norm="clip", projector_ffn_hidden_size=4096),
        language=LanguageModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                     ffn_hidden_size=11008, vocab_size=32000, seq_length=2048,
                                     normalization="RMSNorm", swiglu=True,
                                     disable_bias_linear=True,
                                     untie_embeddings_and_output_weights=True),
        optimizer=OptimizerConfig(lr=2e-5, min_lr=0.0, images_lr=2e-6, images_min_lr=0.0,
                                  weight_decay=0.0, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=150, lr_decay_style="cosine"),
        training=TrainingConfig(micro_batch_size=2, global_batch_size=128, train_iters=5000),
        precision=PrecisionConfig(bf16=True),
        logging=LoggingConfig(log_interval=10),
    )


def llava_8gpu_pp() -> MimoConfig:
    """llava_8gpu with the 7B LLM at TP2xPP2 on ranks 4-7 (16 layers per stage): TP stays
    inside pairs of GPUs, the choice when the GPUs of a node are not all NVLink-connected."""
    return replace(llava_8gpu(), name="llava_8gpu_pp",
                   language_parallel=ParallelismConfig(tp=2, dp=1, pp=2, offset=4))


def tiny_cpu_nemotron() -> MimoConfig:
    """4 CPU ranks, Nemotron-style: RADIO (+ pixel shuffle) TP1xDP2 on ranks 0-1, a Mamba-hybrid
    language model ('M*M-') TP2xDP1 on ranks 2-3."""
    base = tiny_cpu()
    return replace(
        base, name="tiny_cpu_nemotron",
        images=ImagesModelConfig(kind="radio", num_layers=2, hidden_size=64, num_attention_heads=4,
                                   ffn_hidden_size=128, image_size=32, patch_size=4,
                                   class_token_len=8, pixel_shuffle=2),
        language=LanguageModelConfig(kind="mamba_hybrid", num_layers=4, hybrid_pattern="M*M-",
                                     hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                     vocab_size=256, seq_length=48, mamba_state_dim=16,
                                     mamba_head_dim=16, mamba_num_groups=2,
                                     untie_embeddings_and_output_weights=True),
    )


def _nemotron_pattern(blocks: int) -> str:
    """Nemotron-H-like layout: mostly Mamba+MLP pairs, attention every fourth block."""
    return "".join("M*-" if i % 4 == 3 else "M-" for i in range(blocks))


def nemotron_8gpu() -> MimoConfig:
    """8 GPUs: RADIO ViT-H/16 at TP2xDP2 on ranks 0-3, a Mamba-hybrid LLM at TP2xDP2 on ranks 4-7."""
    pattern = _nemotron_pattern(24)
    return MimoConfig(
        name="nemotron_8gpu",
        images_parallel=ParallelismConfig(tp=2, dp=2, offset=0),
        language_parallel=ParallelismConfig(tp=2, dp=2, offset=4),
        images=ImagesModelConfig(kind="radio", num_layers=32, hidden_size=1280,
                                   num_attention_heads=16, ffn_hidden_size=5120, image_size=512,
                                   patch_size=16, class_token_len=8, pixel_shuffle=2),
        language=LanguageModelConfig(kind="mamba_hybrid", num_layers=len(pattern),
                                     hybrid_pattern=pattern, hidden_size=4096,
                                     num_attention_heads=32, ffn_hidden_size=16384,
                                     vocab_size=131072, seq_length=4096, mamba_state_dim=128,
                                     mamba_head_dim=64, mamba_num_groups=8,
                                     untie_embeddings_and_output_weights=True),
        optimizer=OptimizerConfig(lr=1e-5, min_lr=1e-6, images_lr=2e-6, images_min_lr=2e-7,
                                  weight_decay=0.05, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=200, lr_decay_style="cosine"),
        training=TrainingConfig(micro_batch_size=2, global_batch_size=256, train_iters=10000),
        precision=PrecisionConfig(bf16=True),
        logging=LoggingConfig(log_interval=10),
    )


def av_8gpu() -> MimoConfig:
    """8 GPUs, three branches: llava_8gpu's CLIP ViT-L/14-336 at TP2 on ranks 0-1, a Whisper-small
    shaped audio encoder (12 layers, 768 wide, 80 mel bands at 16 kHz, 30 s clips, 4 frames per
    token: 375 audio tokens) at TP1xDP2 on ranks 2-3, the 7B LLM at TP4 on ranks 4-7."""
    base = llava_8gpu()
    return replace(
        base, name="av_8gpu",
        images_parallel=ParallelismConfig(tp=2, dp=1, offset=0),
        audio_parallel=ParallelismConfig(tp=1, dp=2, offset=2),
        audio=AudioModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12,
                               ffn_hidden_size=3072, sample_rate=16000, num_mel_bins=80,
                               n_fft=400, hop_length=160, max_frames=3000, frame_stack=4,
                               projector_ffn_hidden_size=4096),
        optimizer=replace(base.optimizer, audio_lr=2e-5, audio_min_lr=0.0),
    )


PRESETS: dict[str, Callable[[], MimoConfig]] = {
    "tiny_cpu": tiny_cpu,
    "tiny_cpu_av": tiny_cpu_av,
    "av_8gpu": av_8gpu,
    "tiny_cpu_nemotron": tiny_cpu_nemotron,
    "digits_cpu": digits_cpu,
    "llava_digits_cpu": llava_digits_cpu,
    "tiny_cpu_pp": tiny_cpu_pp,
    "llava_8gpu": llava_8gpu,
    "llava_8gpu_pp": llava_8gpu_pp,
    "nemotron_8gpu": nemotron_8gpu,
}


def get_preset(name: str) -> MimoConfig:
    """Build a preset by name; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown --config {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
