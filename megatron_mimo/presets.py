"""Config presets, chosen with ``--config NAME``; flags then override single fields."""

from __future__ import annotations

from collections.abc import Callable

from megatron_mimo.config import (
    EncoderModelConfig,
    LanguageModelConfig,
    LoggingConfig,
    MimoConfig,
    OptimizerConfig,
    ParallelismConfig,
    SchedulerConfig,
    TrainingConfig,
)


def tiny_cpu() -> MimoConfig:
    """4 CPU ranks: images TP1xDP2 on ranks 0-1, language TP2xDP1 on ranks 2-3; trains in minutes."""
    return MimoConfig(
        name="tiny_cpu",
        encoder_parallel=ParallelismConfig(tp=1, dp=2, offset=0),
        language_parallel=ParallelismConfig(tp=2, dp=1, offset=2),
        encoder=EncoderModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                   ffn_hidden_size=128, image_size=32, patch_size=8),
        language=LanguageModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                     ffn_hidden_size=128, vocab_size=256, seq_length=48),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, encoder_lr=1e-3, encoder_min_lr=1e-4),
        scheduler=SchedulerConfig(lr_warmup_iters=5, lr_decay_style="cosine"),
        training=TrainingConfig(micro_batch_size=2, global_batch_size=8, train_iters=40, seed=1234),
        logging=LoggingConfig(log_interval=5),
    )


def llava_8gpu() -> MimoConfig:
    """8 GPUs, LLaVA-like: ViT-L/14-336 at TP2xDP2 on ranks 0-3, a 7B-class GPT at TP4 on ranks 4-7."""
    return MimoConfig(
        name="llava_8gpu",
        encoder_parallel=ParallelismConfig(tp=2, dp=2, offset=0),
        language_parallel=ParallelismConfig(tp=4, dp=1, offset=4),
        encoder=EncoderModelConfig(num_layers=24, hidden_size=1024, num_attention_heads=16,
                                   ffn_hidden_size=4096, image_size=336, patch_size=14),
        language=LanguageModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                     ffn_hidden_size=11008, vocab_size=32000, seq_length=2048),
        optimizer=OptimizerConfig(lr=2e-5, min_lr=0.0, encoder_lr=2e-6, encoder_min_lr=0.0,
                                  weight_decay=0.0, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=150, lr_decay_style="cosine"),
        training=TrainingConfig(micro_batch_size=2, global_batch_size=128, train_iters=5000),
        logging=LoggingConfig(log_interval=10),
    )


PRESETS: dict[str, Callable[[], MimoConfig]] = {
    "tiny_cpu": tiny_cpu,
    "llava_8gpu": llava_8gpu,
}


def get_preset(name: str) -> MimoConfig:
    """Build a preset by name; unknown names list the known ones."""
    from megatron_mimo.config import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown --config {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
