"""A run that loads a checkpoint takes the model architecture from its manifest (fake checkpoint
roots: tracker + manifest only), and the Hugging Face side files travel with the checkpoints."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_mimo.checkpoint import retention, storage
from megatron_mimo.config.cli import config_from_args, flag_name, format_layout
from megatron_mimo.config.from_checkpoint import MODEL_SECTIONS, RUNTIME_FIELDS
from megatron_mimo.config.layout import ParallelismConfig
from megatron_mimo.config.presets import tiny_cpu
from megatron_mimo.config.schema import SECTION_TYPES, MimoConfig
from megatron_mimo.errors import ConfigError
from megatron_mimo.main import main


def saved_config(hidden_size: int = 96) -> MimoConfig:
    """A config whose model differs from tiny_cpu's in every branch."""
    base = tiny_cpu()
    return dataclasses.replace(
        base,
        images=dataclasses.replace(base.images, num_layers=3, hidden_size=48, ffn_hidden_size=96,
                                   activation="quick_gelu", feature_layer=-2, norm_epsilon=1e-6),
        language=dataclasses.replace(base.language, num_layers=4, hidden_size=hidden_size,
                                     ffn_hidden_size=2 * hidden_size, normalization="RMSNorm",
                                     swiglu=True, num_query_groups=2, vocab_size=384))


def write_checkpoint(root, iteration: int = 3, cfg: MimoConfig | None = None,
                     tracker: bool = True, model: dict | None = None) -> None:
    """A published checkpoint as far as the CLI reads it: the manifest (and the tracker)."""
    directory = storage.checkpoint_dir(root, iteration)
    directory.mkdir(parents=True)
    manifest = {key: None for key in storage.MANIFEST_KEYS}
    if cfg is not None:
        data = cfg.to_dict()
        manifest["model"] = model or {section: data[section] for section in MODEL_SECTIONS}
    storage.write_manifest(directory, manifest)
    if tracker:
        storage.write_atomic(root / storage.TRACKER_FILENAME, f"{iteration}\n")


def test_without_model_flags_the_model_is_the_checkpoints(tmp_path):
    write_checkpoint(tmp_path, cfg=saved_config())
    cfg, _ = config_from_args(["--load", str(tmp_path), "--finetune", "--llm-tp", "1",
                               "--llm-dp", "2"])
    assert (cfg.images, cfg.language) == (saved_config().images, saved_config().language)
    assert cfg.language_parallel == ParallelismConfig(tp=1, dp=2, offset=2)  # layout: the flags


def test_an_equal_model_flag_is_accepted(tmp_path):
    write_checkpoint(tmp_path, cfg=saved_config())
    cfg, _ = config_from_args(["--load", str(tmp_path), "--hidden-size", "96", "--swiglu",
                               "--encoder-hidden-size", "48"])
    assert cfg.language == saved_config().language and cfg.images == saved_config().images


def test_a_contradicting_flag_is_one_line_naming_both_values(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_checkpoint(tmp_path, cfg=saved_config())
    assert main(["--load", str(tmp_path), "--hidden-size", "128", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err == (f"megatron-mimo: error: --hidden-size 128 contradicts the checkpoint "
                   f"{tmp_path / 'iter_0000003'} (96): drop the flag to use the checkpoint's "
                   f"architecture\n")


def test_every_contradicting_flag_is_named(tmp_path):
    write_checkpoint(tmp_path, cfg=saved_config())
    with pytest.raises(ConfigError, match=r"^--encoder-num-layers 2, --normalization LayerNorm "
                                          r"contradict the checkpoint .* \(3, RMSNorm\): drop "
                                          r"the flags to"):
        config_from_args(["--load", str(tmp_path), "--encoder-num-layers", "2",
                          "--normalization", "LayerNorm"])


RUNTIME_VALUES = {"hidden_dropout": 0.1, "attention_dropout": 0.2, "seq_length": 64,
                  "image_token": 7}


@pytest.mark.parametrize("name", sorted(RUNTIME_VALUES))
def test_a_runtime_field_may_differ(tmp_path, name):
    write_checkpoint(tmp_path, cfg=saved_config())
    cfg, _ = config_from_args(["--load", str(tmp_path), flag_name("language", name),
                               str(RUNTIME_VALUES[name])])
    assert getattr(cfg.language, name) == RUNTIME_VALUES[name]
    assert cfg.language == dataclasses.replace(saved_config().language,
                                               **{name: RUNTIME_VALUES[name]})


def test_runtime_fields_are_fields_of_the_model_sections():
    fields = {f.name for s in MODEL_SECTIONS for f in dataclasses.fields(SECTION_TYPES[s])}
    assert set(RUNTIME_FIELDS) <= fields


def test_ckpt_step_picks_that_iterations_manifest(tmp_path):
    write_checkpoint(tmp_path, 3, saved_config(hidden_size=96))
    write_checkpoint(tmp_path, 5, saved_config(hidden_size=128))  # the tracker names 5
    latest, _ = config_from_args(["--load", str(tmp_path)])
    picked, _ = config_from_args(["--load", str(tmp_path), "--ckpt-step", "3"])
    assert (latest.language.hidden_size, picked.language.hidden_size) == (128, 96)


@pytest.mark.parametrize("argv", [["--ckpt-step", "3"], ["--load", "{root}", "--ckpt-step", "4"],
                                  ["--load", "{root}/absent"], ["--load", "{root}"]])
def test_nothing_to_load_keeps_the_presets_model(tmp_path, argv):
    """An empty --load (training starts from scratch), an iteration that is not there (the load
    then names it) and --ckpt-step without --load behave as before."""
    (tmp_path / "empty").mkdir()
    write_checkpoint(tmp_path / "ckpt", cfg=saved_config(), tracker=False)
    root = tmp_path / ("ckpt" if "--ckpt-step" in argv else "empty")
    cfg, _ = config_from_args([a.format(root=root) for a in argv] + ["--hidden-size", "128"])
    assert cfg.language == dataclasses.replace(tiny_cpu().language, hidden_size=128)
    assert cfg.images == tiny_cpu().images


def test_a_manifest_without_the_model_keeps_the_presets_model(tmp_path):
    write_checkpoint(tmp_path, cfg=None)
    cfg, _ = config_from_args(["--load", str(tmp_path), "--hidden-size", "128"])
    assert cfg.language == dataclasses.replace(tiny_cpu().language, hidden_size=128)


def test_fields_missing_from_the_manifest_take_the_defaults(tmp_path):
    language = {k: v for k, v in saved_config().to_dict()["language"].items()
                if k != "norm_epsilon"}
    write_checkpoint(tmp_path, cfg=saved_config(),
                     model={"images": saved_config().to_dict()["images"], "language": language})
    cfg, _ = config_from_args(["--load", str(tmp_path)])
    default = SECTION_TYPES["language"]().norm_epsilon
    assert cfg.language == dataclasses.replace(saved_config().language, norm_epsilon=default)


def test_unknown_fields_in_the_manifest_are_one_line_naming_them(tmp_path):
    data = saved_config().to_dict()
    write_checkpoint(tmp_path, cfg=saved_config(),
                     model={"images": {**data["images"], "rope_2d": True},
                            "language": data["language"]})
    with pytest.raises(ConfigError) as caught:
        config_from_args(["--load", str(tmp_path)])
    assert "\n" not in str(caught.value) and "images.rope_2d" in str(caught.value)


def test_an_unreadable_tracker_is_a_config_error(tmp_path):
    (tmp_path / storage.TRACKER_FILENAME).write_text("latest\n")
    with pytest.raises(ConfigError, match="not an iteration number"):
        config_from_args(["--load", str(tmp_path)])


def test_dry_run_prints_the_layout_of_the_checkpoints_model(tmp_path, capsys):
    write_checkpoint(tmp_path, cfg=saved_config())
    assert main(["--load", str(tmp_path), "--finetune", "--dry-run"]) == 0
    expected = dataclasses.replace(saved_config(), checkpoint=dataclasses.replace(
        tiny_cpu().checkpoint, load=str(tmp_path), finetune=True))
    out = capsys.readouterr().out
    assert out == format_layout(expected) + "\n" and out != format_layout(tiny_cpu()) + "\n"


def test_the_cli_reads_the_checkpoint_without_importing_torch(tmp_path):
    write_checkpoint(tmp_path, cfg=saved_config())
    code = ("import sys; from megatron_mimo.config.cli import config_from_args; "
            f"cfg, _ = config_from_args(['--load', {str(tmp_path)!r}]); "
            "assert cfg.language.hidden_size == 96; assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr


def test_manifest_records_the_model():
    from megatron_mimo.checkpoint.contents import Contents, manifest_for

    cfg = saved_config()
    topology = SimpleNamespace(branches=["images", "language"], world_size=4,
                               spec=lambda name: SimpleNamespace(parallel=cfg.parallel(name)))
    contents = Contents(optimizer=True, scheduler=True, rng=True, progress=True,
                        sharding_type="dp_reshardable")
    manifest = manifest_for(3, topology, contents, "fp", cfg.to_dict(), "fp32", {})
    manifest = json.loads(json.dumps(manifest))  # as the file holds it
    assert manifest["model"] == {"images": dataclasses.asdict(cfg.images),
                                 "language": dataclasses.asdict(cfg.language)}


def test_sidecar_is_copied_once_and_never_overwritten(tmp_path):
    load, save = tmp_path / "imported", tmp_path / "run"
    (load / storage.SIDECAR_DIRNAME / "tokenizer").mkdir(parents=True)
    (load / storage.SIDECAR_DIRNAME / "config.json").write_text('{"a": 1}')
    (load / storage.SIDECAR_DIRNAME / "tokenizer" / "vocab.txt").write_text("x")
    assert storage.carry_sidecar(load, save)
    assert (save / "hf" / "config.json").read_text() == '{"a": 1}'
    assert (save / "hf" / "tokenizer" / "vocab.txt").read_text() == "x"
    (load / storage.SIDECAR_DIRNAME / "config.json").write_text('{"a": 2}')
    assert not storage.carry_sidecar(load, save)
    assert (save / "hf" / "config.json").read_text() == '{"a": 1}'
    assert sorted(p.name for p in save.iterdir()) == ["hf"]  # no staging left behind
    assert not storage.carry_sidecar(tmp_path / "plain", tmp_path / "other")  # nothing to carry
    assert not (tmp_path / "other").exists()


def test_sidecar_is_ignored_by_retention_and_cleanup(tmp_path):
    for iteration in (1, 2, 3):
        write_checkpoint(tmp_path, iteration, saved_config())
    (tmp_path / storage.SIDECAR_DIRNAME).mkdir()
    (tmp_path / (storage.TMP_PREFIX + storage.SIDECAR_DIRNAME)).mkdir()  # an interrupted copy
    assert storage.published_iterations(tmp_path) == [1, 2, 3]
    assert storage.remove_stale(tmp_path) == [".tmp_hf"]
    assert retention.prune(tmp_path, 1) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "iter_0000003",
                                                          storage.TRACKER_FILENAME]


def test_a_load_carries_the_sidecar_to_another_save_root(tmp_path, monkeypatch):
    """The manager's step after a load, on a fake one-rank world: no collective unless there
    is another save root, and a failed copy is one CheckpointError."""
    from megatron_mimo.checkpoint import manager
    from megatron_mimo.config.schema import CheckpointConfig
    from megatron_mimo.errors import CheckpointError

    monkeypatch.setattr(manager.dist, "get_rank", lambda: 0)
    (tmp_path / "imported" / "hf").mkdir(parents=True)
    exchanged = []

    def carry(load, save):
        ckpt = CheckpointConfig(load=str(tmp_path / load), save=save and str(tmp_path / save))
        group = SimpleNamespace(exchange=lambda what, value: exchanged.append(value) or [value])
        fake = SimpleNamespace(ckpt=ckpt, coordination=group)
        manager.CheckpointManager._carry_sidecar(fake, Path(ckpt.load))

    carry("imported", None)
    carry("imported", "imported")
    assert exchanged == [] and sorted(p.name for p in tmp_path.iterdir()) == ["imported"]
    carry("imported", "run")
    assert exchanged == [None] and (tmp_path / "run" / "hf").is_dir()

    def full_disk(*args, **kwargs):
        raise OSError("full")

    monkeypatch.setattr(storage.shutil, "copytree", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot copy .*imported/hf to .*other "
                                              r"\(OSError: full\)"):
        carry("imported", "other")


def test_a_tp_that_does_not_divide_the_checkpoints_query_groups_is_one_line(tmp_path, capsys):
    """The imported model has 2 key/value groups: --llm-tp 4 cannot split them."""
    write_checkpoint(tmp_path, cfg=saved_config())
    code = main(["--load", str(tmp_path), "--finetune", "--llm-tp", "4", "--dry-run"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--num-query-groups 2 must divide by --llm-tp 4" in lines[0]


def test_the_model_comes_from_the_pretrained_checkpoint_until_load_holds_one(tmp_path):
    """--pretrained-checkpoint: the run starts from it while --load is empty, and resumes from
    --load once it holds a checkpoint (whose model wins)."""
    pretrained, run = tmp_path / "imported", tmp_path / "run"
    write_checkpoint(pretrained, iteration=0, cfg=saved_config(hidden_size=96))
    flags = ["--pretrained-checkpoint", str(pretrained), "--load", str(run)]
    cfg, _ = config_from_args(flags)
    assert cfg.language.hidden_size == 96
    write_checkpoint(run, iteration=5, cfg=saved_config(hidden_size=128))
    cfg, _ = config_from_args(flags)
    assert cfg.language.hidden_size == 128
