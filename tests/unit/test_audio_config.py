"""The optional audio branch in the config: three disjoint rank sets, its flags, its model
section and token id, one-line errors; a job without it is unchanged."""

import pytest

from megatron_mimo.checkpoint.contents import model_sections
from megatron_mimo.config import AUDIO, IMAGES, LANGUAGE, AudioModelConfig
from megatron_mimo.config.cli import apply_overrides, config_from_args, config_to_argv
from megatron_mimo.config.presets import av_8gpu, tiny_cpu, tiny_cpu_av
from megatron_mimo.errors import ConfigError
from megatron_mimo.main import main


def test_a_job_without_audio_has_two_branches():
    cfg = tiny_cpu()
    assert cfg.branches == (IMAGES, LANGUAGE) and cfg.encoders == (IMAGES,)
    assert cfg.media_tokens == cfg.images.num_image_tokens
    assert "audio" not in model_sections(cfg.to_dict())
    with pytest.raises(KeyError, match="no audio branch"):
        cfg.parallel(AUDIO)


def test_tiny_cpu_av_puts_each_branch_on_its_own_ranks():
    cfg = tiny_cpu_av()
    assert cfg.branches == (IMAGES, AUDIO, LANGUAGE) and cfg.world_size == 4
    assert [s.describe() for s in cfg.branch_specs()] == [
        "images TP1xDP1xPP1 on ranks 0-0", "audio TP1xDP1xPP1 on ranks 1-1",
        "language TP2xDP1xPP1 on ranks 2-3"]
    assert cfg.media_tokens == cfg.images.num_image_tokens + cfg.audio.num_audio_tokens
    assert cfg.optimizer.branch_lr(AUDIO) == (2e-3, 1e-4)
    assert set(model_sections(cfg.to_dict())) == {"images", "language", "audio"}


def test_audio_flags_create_the_branch_and_round_trip():
    cfg, _ = config_from_args(["--audio-offset", "4", "--audio-num-layers", "3",
                               "--audio-lr", "5e-4", "--seq-length", "64"])
    assert cfg.branches == (IMAGES, AUDIO, LANGUAGE) and cfg.world_size == 5
    assert cfg.audio.num_layers == 3 and cfg.optimizer.branch_lr(AUDIO)[0] == 5e-4
    again, _ = config_from_args(config_to_argv(cfg))
    assert again == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"audio_parallel.offset": 2}, "branches overlap: audio TP1xDP1xPP1 on ranks 2-2"),
    ({"audio_parallel.offset": 5}, "ranks 4-4 belong to no branch"),
    ({"audio_parallel.offset": 4, "audio_parallel.pp": 2}, "the audio branch supports pp=1 only"),
    ({"audio_parallel.offset": 4, "language.seq_length": 25},
     "must exceed the image and audio tokens per sample + 1 (25)"),
    ({"audio_parallel.offset": 4, "language.seq_length": 64, "language.audio_token": 255},
     "language.audio_token and language.image_token are both 255"),
    ({"audio_parallel.offset": 4, "language.seq_length": 64, "audio_parallel.tp": 3},
     "audio branch: num_attention_heads 4 must divide by tp 3"),
])
def test_bad_audio_layouts_and_models_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        apply_overrides(tiny_cpu(), overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("fields, message", [
    ({"max_frames": 30}, "audio.max_frames 30 must divide by 2 x frame_stack 2"),
    ({"num_mel_bins": 200}, "audio.num_mel_bins 200 must not exceed the n_fft 256"),
    ({"hidden_size": 65}, "audio.hidden_size 65 must divide by num_attention_heads 4"),
])
def test_bad_audio_model_is_one_line(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AudioModelConfig(**fields)


def test_dry_run_shows_three_branches_with_memory(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--config", "tiny_cpu_av", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "audio TP1xDP1xPP1 on ranks 1-1, 32 sample(s)" in out
    assert "    audio: 111,424 parameters" in out  # the built count: test_hetero_training


def test_av_8gpu_fits_its_gpus():
    from megatron_mimo.config.memory import rank_memory

    cfg = av_8gpu()
    assert cfg.world_size == 8 and cfg.audio.num_audio_tokens == 375
    assert all(rank_memory(cfg, branch).total < 40 * (1 << 30) for branch in cfg.branches)
