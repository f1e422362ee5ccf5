"""CLI: flags, help text, round trip, one-line errors."""

import dataclasses
import os
import subprocess
import sys

import pytest

from megatron_mimo.config.cli import build_parser, config_from_args, config_to_argv, flag_specs
from megatron_mimo.config.presets import llava_8gpu, tiny_cpu
from megatron_mimo.main import main

MEGATRON_FLAGS = ["--micro-batch-size", "--global-batch-size", "--lr", "--min-lr",
                  "--lr-warmup-iters", "--lr-decay-style", "--train-iters", "--seed",
                  "--lr-decay-iters", "--weight-decay", "--clip-grad", "--log-interval",
                  "--eval-interval", "--eval-iters", "--save", "--load", "--save-interval",
                  "--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                  "--tensorboard-dir", "--exit-interval"]
HETERO_FLAGS = ["--encoder-tp", "--encoder-dp", "--llm-tp", "--llm-dp", "--llm-pp", "--llm-offset",
                "--encoder-lr"]


def test_flags_exist_with_help():
    by_flag = {s.flag: s for s in flag_specs()}
    for flag in MEGATRON_FLAGS + HETERO_FLAGS:
        assert flag in by_flag, flag
        assert by_flag[flag].help, flag
    help_text = build_parser().format_help()
    assert "Tensor-parallel size of the branch." in help_text


def test_overrides_apply_to_the_right_fields():
    cfg, _ = config_from_args(["--config", "tiny_cpu", "--lr", "0.01", "--encoder-tp", "2",
                               "--encoder-dp", "1", "--llm-tp", "1", "--llm-dp", "2",
                               "--micro-batch-size", "1", "--lr-decay-style", "linear"])
    assert cfg.optimizer.lr == 0.01
    assert (cfg.images_parallel.tp, cfg.images_parallel.dp) == (2, 1)
    assert (cfg.language_parallel.tp, cfg.language_parallel.dp) == (1, 2)
    assert cfg.training.micro_batch_size == 1
    assert cfg.scheduler.lr_decay_style == "linear"
    assert cfg.optimizer.min_lr == tiny_cpu().optimizer.min_lr  # untouched fields keep preset values


@pytest.mark.parametrize("preset", [tiny_cpu, llava_8gpu])
def test_round_trip_config_to_argv_and_back(preset):
    cfg = preset()
    changed = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=0.123456789),
                                  checkpoint=dataclasses.replace(cfg.checkpoint, save="/tmp/x"))
    rebuilt, _ = config_from_args(config_to_argv(changed))
    assert rebuilt == changed


def test_dry_run_prints_layout(capsys):
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "images TP1xDP2xPP1 on ranks 0-1" in out and "language TP2xDP1xPP1 on ranks 2-3" in out
    assert "4 micro-step(s) x 2 samples" in out


def test_bad_layout_is_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--encoder-tp", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-mimo: error: branches overlap")


def test_world_size_mismatch_is_reported(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([]) == 2
    assert "needs 4 ranks but torchrun started 2" in capsys.readouterr().err


def test_console_script_bad_layout_exits_non_zero_without_traceback():
    exe = os.path.join(os.path.dirname(sys.executable), "megatron-mimo")
    proc = subprocess.run([exe, "--encoder-tp", "3"], capture_output=True, text=True,
                          env={**os.environ, "WORLD_SIZE": "4"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "error:" in proc.stderr


def test_console_script_help_lists_flags():
    exe = os.path.join(os.path.dirname(sys.executable), "megatron-mimo")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in HETERO_FLAGS + ["--micro-batch-size", "--lr-warmup-iters"]:
        assert flag in proc.stdout


def test_without_torchrun_says_how_to_launch(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--config", "tiny_cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --standalone --nproc-per-node 4" in err[0]


def test_input_error_at_run_time_is_one_line_and_exit_1(capsys, monkeypatch):
    from megatron_mimo.errors import CheckpointError
    from megatron_mimo.training import trainer

    def fail(cfg):
        raise CheckpointError("/ckpt/iter_0000003/__0_0.distcp is truncated: 10 bytes, its items need 20")

    monkeypatch.setattr(trainer, "run", fail)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--config", "tiny_cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("megatron-mimo")]
    assert ours == ["megatron-mimo: error: rank 1: /ckpt/iter_0000003/__0_0.distcp is truncated: "
                    "10 bytes, its items need 20"]


def test_errors_name_flags_not_config_fields(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--encoder-image-size", "30", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-mimo: error: --encoder-image-size 30 must divide by patch_size")


@pytest.mark.parametrize("argv, message", [
    (["--llm-pp", "3", "--llm-offset", "2"],
     "language branch: num_layers 4 cannot be split over --llm-pp 3 stages"),
    (["--global-batch-size", "2"], "--llm-pp 2 needs at least 2 micro-batches per iteration, got 1"),
    (["--encoder-pp", "2"], "the images branch supports pp=1 only, got --encoder-pp 2"),
    (["--llm-kind", "mamba_hybrid", "--hybrid-override-pattern", "M*M", "--num-layers", "3"],
     "language branch: hybrid_pattern 'M*M' (3 layers) cannot be split over --llm-pp 2 stages"),
])
def test_pipeline_errors_are_one_line_in_dry_run(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--config", "tiny_cpu_pp", *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("megatron-mimo: error: ") and message in err, err


def test_dry_run_prints_pipeline_stages(capsys):
    assert main(["--config", "tiny_cpu_pp", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "language TP1xDP1xPP2 on ranks 2-3" in out
    assert "2 stages x 2 layer(s)" in out
    assert "language stage 0: 83,328 parameters" in out and "language stage 1: 83,456 parameters" in out


def test_data_command_runs_without_torchrun_and_reports_one_line(tmp_path, capsys):
    assert main(["data", "prepare-digits", str(tmp_path)]) == 1  # exists already
    err = capsys.readouterr().err.strip()
    assert err == f"megatron-mimo: error: {tmp_path} already exists: choose another folder or delete it"


def test_llama_flags_use_megatrons_names():
    cfg, _ = config_from_args([
        "--config", "tiny_cpu", "--normalization", "RMSNorm", "--swiglu",
        "--num-query-groups", "2", "--disable-bias-linear", "--position-embedding-type", "rope",
        "--rotary-base", "500000", "--untie-embeddings-and-output-weights"])
    language = cfg.language
    assert (language.normalization, language.swiglu, language.num_query_groups) == ("RMSNorm", True, 2)
    assert language.disable_bias_linear and language.untie_embeddings_and_output_weights
    assert (language.position_embedding_type, language.rotary_base) == ("rope", 500000)
