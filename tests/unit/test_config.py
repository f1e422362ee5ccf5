"""Config dataclasses: defaults, presets, validation messages that name the numbers."""

import dataclasses

import pytest

from megatron_mimo.config import IMAGES, LANGUAGE, MimoConfig, ParallelismConfig
from megatron_mimo.config.cli import field_docs
from megatron_mimo.config.presets import PRESETS, get_preset, llava_8gpu, tiny_cpu
from megatron_mimo.config.schema import SECTION_TYPES
from megatron_mimo.errors import ConfigError


def test_tiny_cpu_layout():
    cfg = tiny_cpu()
    assert cfg.world_size == 4
    assert cfg.images_parallel == ParallelismConfig(tp=1, dp=2, pp=1, offset=0)
    assert cfg.language_parallel == ParallelismConfig(tp=2, dp=1, pp=1, offset=2)
    assert cfg.job_micro_batch == 2 and cfg.num_microbatches == 4
    assert cfg.branch_micro_batch(IMAGES) == 1 and cfg.branch_micro_batch(LANGUAGE) == 2


def test_gpu_preset_is_eight_ranks():
    cfg = llava_8gpu()
    assert cfg.world_size == 8
    assert [s.describe() for s in cfg.branch_specs()] == [
        "images TP2xDP2xPP1 on ranks 0-3", "language TP4xDP1xPP1 on ranks 4-7"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips_through_dict(name):
    cfg = get_preset(name)
    assert cfg.name == name
    assert MimoConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="known presets: av_8gpu, digits_cpu, llava_8gpu, llava_8gpu_pp, "
                                          "llava_digits_cpu, nemotron_8gpu, tiny_cpu, tiny_cpu_av, "
                                          "tiny_cpu_nemotron, tiny_cpu_pp"):
        get_preset("nope")


def test_every_field_has_a_docstring():
    for cls in [*SECTION_TYPES.values(), MimoConfig]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_branch_lr_falls_back_to_language_lr():
    opt = dataclasses.replace(tiny_cpu().optimizer, images_lr=None, images_min_lr=None)
    assert opt.branch_lr(IMAGES) == opt.branch_lr(LANGUAGE) == (opt.lr, opt.min_lr)
    assert tiny_cpu().optimizer.branch_lr(IMAGES) == (1e-3, 1e-4)


def _with(cfg, section, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


@pytest.mark.parametrize("section, changes, message", [
    ("images_parallel", {"tp": 3}, r"branches overlap: images TP3xDP2xPP1 on ranks 0-5 and language"),
    ("language_parallel", {"offset": 3}, r"ranks 2-2 belong to no branch"),
    ("training", {"global_batch_size": 7}, r"global_batch_size 7 must divide by micro_batch_size 2"),
    ("training", {"micro_batch_size": 1, "global_batch_size": 4}, r"does not split over the images branch's dp 2"),
    ("images_parallel", {"pp": 2}, r"images branch supports pp=1 only"),
    ("language_parallel", {"tp": 3}, r"language branch: num_attention_heads 4 must divide by tp 3"),
])
def test_layout_errors_name_the_numbers(section, changes, message):
    with pytest.raises(ConfigError, match=message):
        _with(tiny_cpu(), section, **changes)


@pytest.mark.parametrize("section, changes, message", [
    ("images", {"kind": "cnn"}, "images.kind must be one of"),
    ("images", {"image_size": 30}, "image_size 30 must divide by patch_size 8"),
    ("language", {"hybrid_pattern": "MX"}, "may hold only"),
    ("optimizer", {"min_lr": 1.0}, "min_lr 1.0 must be <= lr"),
    ("scheduler", {"lr_decay_style": "step"}, "lr_decay_style must be one of"),
    ("training", {"train_iters": 0}, "training.train_iters must be >= 1, got 0"),
    ("images_parallel", {"dp": 0}, "parallelism.dp must be >= 1, got 0"),
])
def test_section_validation(section, changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(getattr(tiny_cpu(), section), **changes)


LLAMA = {"normalization": "RMSNorm", "swiglu": True, "num_query_groups": 2,
         "disable_bias_linear": True, "rotary_base": 500000}


def test_llama_options_validate_against_the_layout():
    llama = _with(tiny_cpu(), "language", **LLAMA)  # 4 heads, 2 key/value groups, TP2
    assert llama.language.query_groups == 2
    with pytest.raises(ConfigError, match=r"language.num_query_groups 1 must divide by language_parallel.tp 2"):
        _with(tiny_cpu(), "language", num_query_groups=1)
    with pytest.raises(ConfigError, match=r"num_query_groups 3 must divide num_attention_heads 4"):
        _with(tiny_cpu(), "language", num_query_groups=3)


def test_tied_output_layer_needs_one_language_stage():
    cfg = tiny_cpu()
    tied = dataclasses.replace(cfg.language, untie_embeddings_and_output_weights=False)
    one_stage = dataclasses.replace(cfg, language=tied)  # tied at PP1: fine
    assert not one_stage.language.untie_embeddings_and_output_weights
    with pytest.raises(ConfigError, match=r"--llm-pp 2: the output layer shares the word "
                                          r"embeddings.*--untie-embeddings-and-output-weights"):
        dataclasses.replace(cfg, language=tied, language_parallel=ParallelismConfig(
            tp=1, dp=1, pp=2, offset=2))


@pytest.mark.parametrize("changes, message", [
    ({"normalization": "LayerNorm2"}, "normalization must be one of"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type must be one of"),
    ({"rotary_base": 0}, "rotary_base must be >= 1, got 0"),
    ({"kind": "mamba_hybrid", "num_layers": 4, "swiglu": True},
     "language.swiglu applies to the GPT language model only, not to mamba_hybrid"),
])
def test_language_option_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(tiny_cpu().language, **changes)
