"""Command line <-> config: ``--config NAME`` picks a preset, flags override single fields.

Flag names follow Megatron-LM where Megatron has one (``--micro-batch-size``, ``--lr``, ...);
the heterogeneous layout uses ``--encoder-tp/--encoder-dp`` and ``--llm-tp/--llm-dp/--llm-pp/
--llm-offset``. Help text comes from the field docstrings of the config dataclasses.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from megatron_mimo.config.from_checkpoint import checkpoint_model
from megatron_mimo.config.memory import format_memory
from megatron_mimo.config.presets import PRESETS, get_preset
from megatron_mimo.config.schema import SECTION_TYPES, MimoConfig
from megatron_mimo.errors import ConfigError

SECTION_PREFIX: dict[str, str] = {
    "images_parallel": "encoder-",
    "language_parallel": "llm-",
    "images": "encoder-",
    "audio_parallel": "audio-",
    "audio": "audio-",
}
"""Flag prefix per config section; sections not listed use bare (Megatron) names. This table and
:data:`FLAG_RENAMES` are the one place where the code's branch names (``images``, ``language``)
meet Megatron's flag names (``--encoder-*``, ``--llm-*``)."""

FLAG_RENAMES: dict[tuple[str, str], str] = {
    ("language", "kind"): "--llm-kind",
    ("language", "hybrid_pattern"): "--hybrid-override-pattern",
    ("language", "image_token"): "--image-token-id",
    ("optimizer", "images_lr"): "--encoder-lr",
    ("optimizer", "images_min_lr"): "--encoder-min-lr",
    ("optimizer", "audio_lr"): "--audio-lr",
    ("optimizer", "audio_min_lr"): "--audio-min-lr",
    ("language", "audio_token"): "--audio-token-id",
}
"""Fields whose flag is not prefix + field name."""


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One command-line flag bound to one config field."""

    flag: str
    section: str
    field: str
    type: type
    help: str


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (the string literal after each annotation),
    including those of dataclass base classes."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _scalar_type(annotation: Any) -> type:
    """int | None -> int; bool stays bool."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def flag_name(section: str, name: str) -> str:
    """The command-line flag of config field ``section.name``."""
    return FLAG_RENAMES.get((section, name),
                            "--" + SECTION_PREFIX.get(section, "") + name.replace("_", "-"))


def name_flags(message: str) -> str:
    """``message`` with every ``section.field`` of the config replaced by its flag, so an error
    tells the user what to type (``images.image_size`` -> ``--encoder-image-size``)."""
    def replace(match: re.Match) -> str:
        section, name = match.group(1), match.group(2)
        fields = {f.name for f in dataclasses.fields(SECTION_TYPES[section])}
        return flag_name(section, name) if name in fields else match.group(0)

    sections = "|".join(sorted(SECTION_TYPES, key=len, reverse=True))
    return re.sub(rf"\b({sections})\.([a-z_0-9]+)\b", replace, message)


@functools.cache
def flag_specs() -> tuple[FlagSpec, ...]:
    """Every overridable field as a FlagSpec; flag names are checked to be unique."""
    specs: list[FlagSpec] = []
    for section, cls in SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = flag_name(section, f.name)
            kind = _scalar_type(hints[f.name])
            if kind is bool and f.default is not False:
                raise RuntimeError(f"{section}.{f.name}: boolean fields must default to False "
                                   "(flags only switch things on, as Megatron's do)")
            specs.append(FlagSpec(flag, section, f.name, kind, docs[f.name]))
    flags = [s.flag for s in specs]
    duplicates = {f for f in flags if flags.count(f) > 1}
    if duplicates:
        raise RuntimeError(f"config fields map to the same flag: {sorted(duplicates)}")
    return tuple(specs)


def build_parser() -> argparse.ArgumentParser:
    """The ``megatron-mimo`` argument parser (flags default to 'not given')."""
    parser = argparse.ArgumentParser(
        prog="megatron-mimo",
        description="Train a vision-language model whose image encoder and language model live "
                    "on different ranks with their own parallelism. Launch with torchrun.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", default="tiny_cpu", choices=sorted(PRESETS),
                        help="preset to start from (default: tiny_cpu)")
    parser.add_argument("--dry-run", action="store_true", default=False,
                        help="validate the config and print the per-rank layout, then exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in flag_specs():
        group = groups.setdefault(spec.section, parser.add_argument_group(spec.section))
        if spec.type is bool:
            group.add_argument(spec.flag, dest=f"{spec.section}.{spec.field}",
                               action="store_true", help=spec.help)
        else:
            group.add_argument(spec.flag, dest=f"{spec.section}.{spec.field}", type=spec.type,
                               metavar=spec.type.__name__.upper(), help=spec.help)
    return parser


def apply_overrides(cfg: MimoConfig, overrides: dict[str, Any]) -> MimoConfig:
    """Return ``cfg`` with ``{"section.field": value}`` applied; validation runs once at the end.
    A field of an absent section (the audio branch's layout) creates it from its defaults."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        section, name = dotted.split(".", 1)
        by_section.setdefault(section, {})[name] = value
    sections = {section: dataclasses.replace(getattr(cfg, section) or SECTION_TYPES[section](),
                                             **fields)
                for section, fields in by_section.items()}
    return dataclasses.replace(cfg, **sections)


def config_from_args(argv: Sequence[str] | None = None) -> tuple[MimoConfig, argparse.Namespace]:
    """Parse ``argv`` into a validated config (raises ConfigError on bad values).

    With a checkpoint to load (--load's, else --pretrained-checkpoint's), the model sections come
    from its manifest instead of the preset
    (the weights fix them); explicit flags apply on top and may change runtime fields only."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    preset = get_preset(args.config)
    def given(name: str):
        return overrides.get(f"checkpoint.{name}", getattr(preset.checkpoint, name))

    try:
        model = checkpoint_model(given("load"), given("ckpt_step"), overrides,
                                 pretrained=given("pretrained_checkpoint"))
    except ConfigError as error:  # name the flags the user typed, not the config fields
        raise ConfigError(name_flags(str(error))) from None
    return apply_overrides(preset, {**model, **overrides}), args


def config_to_argv(cfg: MimoConfig) -> list[str]:
    """Flags that rebuild ``cfg`` from its preset (every field spelled out; used in tests/logs)."""
    argv = ["--config", cfg.name] if cfg.name in PRESETS else []
    for spec in flag_specs():
        value = getattr(getattr(cfg, spec.section), spec.field, None)
        if value is None:
            continue
        if spec.type is bool:
            argv += [spec.flag] if value else []
        else:
            argv += [spec.flag, repr(value) if spec.type is float else str(value)]
    return argv


def format_layout(cfg: MimoConfig) -> str:
    """Human table of the job: one line per branch, micro-batching, memory per rank."""
    lines = [f"config {cfg.name}: world size {cfg.world_size}"]
    for spec in cfg.branch_specs():
        lines.append(f"  {spec.describe()}, {cfg.branch_micro_batch(spec.name)} sample(s) "
                     f"per DP rank per micro-step")
    lines.append(f"  global batch {cfg.training.global_batch_size} = {cfg.num_microbatches} "
                 f"micro-step(s) x {cfg.job_micro_batch} samples")
    pp = cfg.language_parallel.pp
    if pp > 1:
        layers = f"{cfg.language.num_layers // pp} layer(s)"
        if cfg.language.kind == "mamba_hybrid":
            layers += " " + " | ".join(cfg.language.stage_patterns(pp))
        lines.append(f"  language pipeline: {pp} stages x {layers} (embedding on stage 0, output layer and loss on stage {pp - 1}), "
                     f"megatron-core 1F1B schedule over {cfg.num_microbatches} micro-batches")
    lines.append(format_memory(cfg))
    return "\n".join(lines)
