"""The layouts of the checkpoint worlds (:mod:`tests.workers.ckpt_world`) and the config of
each: tiny models with dropout on every branch, warmup past the save at iteration N."""

from __future__ import annotations

from typing import Any

from megatron_mimo.config import MimoConfig
from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.presets import tiny_cpu, tiny_cpu_nemotron

N = 3
LAYOUTS = {
    "images_tp1dp2_language_tp2dp1": {},
    "images_tp2dp1_language_tp1dp2": {
        "images_parallel.tp": 2, "images_parallel.dp": 1, "language_parallel.tp": 1,
        "language_parallel.dp": 2, "training.micro_batch_size": 1},
    "images_tp1dp1_language_tp1dp1": {
        "images_parallel.dp": 1, "language_parallel.tp": 1, "language_parallel.offset": 1},
    "images_tp1dp3_language_tp1dp1": {
        "images_parallel.dp": 3, "language_parallel.tp": 1, "language_parallel.offset": 3,
        "training.micro_batch_size": 3, "training.global_batch_size": 6},
    "nemotron_images_tp1dp2_language_tp2dp1": {},  # RADIO + Mamba hybrid
    "images_tp1dp2_language_pp2": {  # language over 2 pipeline stages, 4 micro-batches
        "language_parallel.tp": 1, "language_parallel.pp": 2},
    "av_images_dp1_audio_dp2_language_tp1": {  # three branches: images 0, audio 1-2, language 3
        "images_parallel.dp": 1, "audio_parallel.offset": 1, "audio_parallel.dp": 2,
        "language_parallel.tp": 1, "language_parallel.offset": 3, "language.seq_length": 64},
    "av_images_dp2_audio_dp1_language_tp1": {  # images 0-1, audio 2, language 3
        "audio_parallel.offset": 2, "language_parallel.tp": 1, "language_parallel.offset": 3,
        "language.seq_length": 64},
}
PRESET = {"nemotron_images_tp1dp2_language_tp2dp1": tiny_cpu_nemotron}
TWO_RANKS = "images_tp1dp1_language_tp1dp1"
UNEVEN = "images_tp1dp3_language_tp1dp1"


def make_cfg(layout: str, overrides: dict[str, Any] | None = None) -> MimoConfig:
    base = {"images.hidden_dropout": 0.1, "images.attention_dropout": 0.1,
            "language.hidden_dropout": 0.1, "language.attention_dropout": 0.1,
            "audio.hidden_dropout": 0.1, "audio.attention_dropout": 0.1,
            "scheduler.lr_warmup_iters": N + 1, "training.train_iters": 2 * N,
            "training.global_batch_size": 8, "training.eval_iters": 1,
            "checkpoint.ckpt_timeout_s": 20}
    return apply_overrides(PRESET.get(layout, tiny_cpu)(),
                           {**base, **LAYOUTS[layout], **(overrides or {})})
