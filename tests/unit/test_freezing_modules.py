"""Freezing (megatron_mimo/models/freezing.py) on small stand-in modules, and its flags."""

import dataclasses

import pytest
import torch
from torch import nn

from megatron_mimo.config.cli import apply_overrides, config_from_args, flag_specs
from megatron_mimo.config.layout import IMAGES, LANGUAGE
from megatron_mimo.config.presets import tiny_cpu
from megatron_mimo.config.schema import TrainingConfig
from megatron_mimo.errors import ConfigError
from megatron_mimo.main import main
from megatron_mimo.models.freezing import (
    PartCounts,
    format_counts,
    freeze_branch,
    frozen_parts,
    parameter_counts,
    train_mode,
)

FLAGS = {"--freeze-vit": "freeze_vit", "--freeze-projection": "freeze_projection",
         "--freeze-lm": "freeze_lm"}


class Images(nn.Module):
    """The images branch's layout: ``encoders.vit`` then ``input_projections.0``, with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"vit": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))})
        self.input_projections = nn.ModuleList([nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_projections[0](self.encoders["vit"](x))


def _training(**flags: bool) -> TrainingConfig:
    return TrainingConfig(**flags)


@pytest.mark.parametrize("flags, images, language", [
    ({}, (), ()),
    ({"freeze_vit": True}, ("vit",), ()),
    ({"freeze_projection": True}, ("projection",), ()),
    ({"freeze_lm": True}, (), ("lm",)),
    ({"freeze_vit": True, "freeze_lm": True}, ("vit",), ("lm",)),
    ({"freeze_vit": True, "freeze_projection": True}, ("vit", "projection"), ()),
])
def test_frozen_parts_per_branch(flags, images, language):
    assert frozen_parts(_training(**flags), IMAGES) == images
    assert frozen_parts(_training(**flags), LANGUAGE) == language


def test_freeze_vit_freezes_only_the_encoder_and_puts_it_in_eval_mode():
    module = Images()
    assert freeze_branch(module, IMAGES, _training(freeze_vit=True)) == ("vit",)
    assert not any(p.requires_grad for p in module.encoders.parameters())
    assert all(p.requires_grad for p in module.input_projections.parameters())
    assert not any(m.training for m in module.encoders.modules())
    assert all(m.training for m in module.input_projections.modules())
    assert parameter_counts(module, IMAGES) == {"vit": PartCounts(0, 20),
                                                "projection": PartCounts(30, 0)}


def test_a_frozen_module_still_passes_gradients_back():
    """Freezing is requires_grad=False, not no_grad: the projector, frozen, still carries the
    gradient to the encoder in front of it (as a frozen LLM does to the projector)."""
    module = Images()
    freeze_branch(module, IMAGES, _training(freeze_projection=True))
    module(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is None for p in module.input_projections.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.encoders.parameters())


def test_train_mode_keeps_frozen_modules_in_eval_mode_inside_wrappers():
    module = Images()
    freeze_branch(module, IMAGES, _training(freeze_vit=True))
    wrapper = nn.ModuleDict({"images": nn.Sequential(module), "text": nn.Dropout(0.5)})
    wrapper.eval()
    train_mode(wrapper)  # what the trainer does after an evaluation
    assert not any(m.training for m in module.encoders.modules())
    assert all(m.training for m in module.input_projections.modules())
    assert wrapper.training and wrapper["text"].training
    module.encoders.requires_grad_(True)  # nothing frozen: train_mode is model.train()
    train_mode(wrapper)
    assert all(m.training for m in wrapper.modules())


def test_language_branch_is_one_part():
    module = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    assert freeze_branch(module, LANGUAGE, _training(freeze_lm=True)) == ("lm",)
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert parameter_counts(module, LANGUAGE) == {"lm": PartCounts(0, 20)}


def test_replicated_parameters_count_on_tp_rank_0_only():
    module = Images()
    for param in module.encoders.parameters():
        param.tensor_model_parallel = True  # a TP shard: counted on every TP rank
    assert parameter_counts(module, IMAGES, tp_rank=1) == {"vit": PartCounts(20, 0),
                                                           "projection": PartCounts(0, 0)}


def test_a_parameter_outside_every_part_is_an_error():
    module = Images()
    module.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'extra.weight' belongs to none of"):
        parameter_counts(module, IMAGES)


def test_counts_log_line():
    line = format_counts(IMAGES, {"vit": PartCounts(0, 1234567), "projection": PartCounts(89, 0)})
    assert line == ("images branch parameters: vit 0 trainable, 1,234,567 frozen; "
                    "projection 89 trainable, 0 frozen")


def test_flags_are_megatrons_names_with_help():
    by_flag = {spec.flag: spec for spec in flag_specs()}
    for flag, name in FLAGS.items():
        assert (by_flag[flag].section, by_flag[flag].field) == ("training", name)
        assert by_flag[flag].help
    cfg, _ = config_from_args(["--freeze-vit", "--freeze-lm"])
    assert (cfg.training.freeze_vit, cfg.training.freeze_projection, cfg.training.freeze_lm) == (
        True, False, True)
    assert dataclasses.asdict(TrainingConfig())["freeze_lm"] is False


def test_freezing_everything_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([*FLAGS, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("megatron-mimo: error: ")
    assert "--freeze-vit, --freeze-projection and --freeze-lm together leave nothing to train" in err


def test_fp16_with_a_frozen_language_model_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--freeze-lm", "--fp16", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--freeze-lm with --fp16" in err and "--bf16" in err
    frozen = {f"training.{name}": True for name in FLAGS.values()}
    with pytest.raises(ConfigError, match="leave nothing to train"):
        apply_overrides(tiny_cpu(), frozen)


def test_with_an_audio_branch_freezing_everything_else_leaves_audio_to_train():
    frozen = {f"training.{name}": True for name in FLAGS.values()}
    audio = {"audio_parallel.offset": 4, "language.seq_length": 64}
    assert apply_overrides(tiny_cpu(), {**frozen, **audio}).training.freeze_lm
    with pytest.raises(ConfigError, match="and training.freeze_lm together leave nothing"):
        apply_overrides(tiny_cpu(), {**frozen, **audio, "training.freeze_audio": True})
