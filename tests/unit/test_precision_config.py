"""Precision flags, their one-line errors, and the memory arithmetic --dry-run prints."""

import dataclasses

import pytest

from megatron_mimo.config.cli import apply_overrides, config_from_args, format_layout
from megatron_mimo.config.memory import rank_memory
from megatron_mimo.config.presets import PRESETS, llava_8gpu, nemotron_8gpu, tiny_cpu
from megatron_mimo.errors import ConfigError
from megatron_mimo.main import main


def test_megatron_flag_names_reach_the_precision_section():
    cfg, _ = config_from_args(["--fp16", "--initial-loss-scale", "1024", "--min-loss-scale", "2",
                               "--loss-scale-window", "50", "--hysteresis", "3"])
    assert cfg.precision.name == "fp16" and not cfg.precision.grads_in_fp32
    assert cfg.precision.scaler() == {"loss_scale": None, "initial_loss_scale": 1024.0,
                                      "min_loss_scale": 2.0, "loss_scale_window": 50,
                                      "hysteresis": 3}
    cfg, _ = config_from_args(["--fp16", "--accumulate-allreduce-grads-in-fp32", "--loss-scale", "8"])
    assert cfg.precision.grads_in_fp32 and cfg.precision.scaler()["loss_scale"] == 8.0
    cfg, _ = config_from_args(["--bf16"])
    assert cfg.precision.name == "bf16" and cfg.precision.grads_in_fp32  # on with bf16, as Megatron


def test_presets_default_precision():
    assert llava_8gpu().precision.name == nemotron_8gpu().precision.name == "bf16"
    assert all(PRESETS[name]().precision.name == "fp32" for name in PRESETS if name.startswith("tiny"))


@pytest.mark.parametrize("argv, message", [
    (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
    (["--loss-scale", "8"], "--loss-scale applies to --fp16 only"),
    (["--bf16", "--hysteresis", "4"], "--hysteresis applies to --fp16 only"),
    (["--fp16", "--initial-loss-scale", "0"], "--initial-loss-scale must be > 0"),
])
def test_bad_precision_flags_are_one_line_errors(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=message):
        config_from_args(argv)
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_memory_per_rank_in_each_precision():
    fp32 = rank_memory(tiny_cpu(), "language")
    bf16 = rank_memory(apply_overrides(tiny_cpu(), {"precision.bf16": True}), "language")
    fp16 = rank_memory(apply_overrides(tiny_cpu(), {"precision.fp16": True}), "language")
    params = fp32.parameters  # language TP2 x DP1 on ranks 2-3
    assert (fp32.weights, fp32.grads, fp32.main_params, fp32.adam) == (4 * params, 4 * params, 0, 8 * params)
    assert (bf16.weights, bf16.grads, bf16.main_params, bf16.adam) == (2 * params, 4 * params, 4 * params, 8 * params)
    assert (fp16.weights, fp16.grads) == (2 * params, 2 * params)
    images = rank_memory(tiny_cpu(), "images")  # DP2: optimizer state is sharded over 2 ranks
    assert images.adam == 8 * images.parameters // 2


def test_dry_run_shows_what_fits():
    text = format_layout(llava_8gpu())
    assert "memory per rank (bf16" in text
    assert "language: 1,684,803,584 parameters" in text and "total 28.24 GiB" in text


def test_llama2_7b_parameter_count_is_the_published_one():
    # Llama-2-7B: 6,738,415,616 parameters (untied output layer, RMSNorm, SwiGLU, no biases);
    # at TP1 nothing is replicated, so the estimate must equal it exactly
    from megatron_mimo.config.memory import language_parameters

    assert language_parameters(llava_8gpu().language, tp=1) == 6_738_415_616
    gqa = dataclasses.replace(llava_8gpu().language, num_query_groups=8)  # 8 key/value heads
    saved = 2 * 32 * (32 - 8) * 128 * 4096  # k and v of 24 heads fewer, 32 layers
    assert language_parameters(gqa, tp=1) == 6_738_415_616 - saved
