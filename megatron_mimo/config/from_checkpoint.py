"""The model architecture a checkpoint records, as config overrides for a run that loads it.

A run with ``--load DIR`` must build the model the checkpoint's weights belong to, whatever the
preset says; repeating the model flags is error-prone (a wrong one only shows up as a shape
error deep inside the load, on every rank). The manifest of every checkpoint records the
``images`` and ``language`` sections (and ``audio`` when the job had an audio branch), so the CLI reads them here, before any process group
exists. JSON only: no torch import on this path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_mimo.checkpoint import storage
from megatron_mimo.config.schema import SECTION_TYPES
from megatron_mimo.errors import CheckpointError, ConfigError

MODEL_SECTIONS = ("images", "language")
"""Config sections every checkpoint's manifest records under ``model``."""
OPTIONAL_SECTIONS = ("audio",)
"""Sections recorded only when the job had that branch."""

RUNTIME_FIELDS = ("hidden_dropout", "attention_dropout", "seq_length", "image_token", "audio_token")
"""Fields of the model sections that do not change the weights: a flag may set them to another
value than the checkpoint's (``image_token`` is the field behind ``--image-token-id``)."""


def checkpoint_directory(load: str | None, step: int | None) -> Path | None:
    """The iteration directory a load would read (``step``, else the tracker's), or None when
    ``load`` holds no published checkpoint there: the run then starts from scratch."""
    if not load:
        return None
    try:
        iteration = step if step is not None else storage.read_tracker(load)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if iteration is None:
        return None
    directory = storage.checkpoint_dir(load, iteration)
    return directory if (directory / storage.MANIFEST_FILENAME).is_file() else None


def saved_model(directory: Path) -> dict[str, Any] | None:
    """The model sections recorded in ``directory``'s manifest, as config dataclasses; None for
    a manifest written before the model was recorded."""
    try:
        model = storage.read_manifest(directory).get("model")
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if model is None:
        return None
    where = directory / storage.MANIFEST_FILENAME
    sections = MODEL_SECTIONS + tuple(s for s in OPTIONAL_SECTIONS
                                      if isinstance(model, dict) and s in model)
    if not isinstance(model, dict) or not all(isinstance(model.get(s, {}), dict)
                                              for s in sections):
        raise ConfigError(f"{where}: 'model' must map {', '.join(sections)} to objects")
    return {section: _section(section, model.get(section, {}), where) for section in sections}


def _section(section: str, saved: dict[str, Any], where: Path) -> Any:
    """One section; fields the manifest lacks take the dataclass defaults."""
    cls = SECTION_TYPES[section]
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        names = ", ".join(f"{section}.{name}" for name in unknown)
        raise ConfigError(f"{where} records model fields this version does not know: {names} "
                          f"(saved by a newer megatron-mimo?)")
    return cls(**saved)


def check_flags(sections: dict[str, Any], overrides: dict[str, Any], directory: Path) -> None:
    """Refuse explicit ``section.field`` overrides of the model that differ from the checkpoint
    (runtime fields excepted), in one line naming each given and saved value."""
    clashes = []
    for dotted, given in overrides.items():
        section, name = dotted.split(".", 1)
        if section not in sections or name in RUNTIME_FIELDS:
            continue
        saved = getattr(sections[section], name)
        if given != saved:
            clashes.append((dotted if given is True else f"{dotted} {given}", saved))
    if not clashes:
        return
    flags = ", ".join(flag for flag, _ in clashes)
    values = ", ".join(str(saved) for _, saved in clashes)
    verb, noun = ("contradicts", "flag") if len(clashes) == 1 else ("contradict", "flags")
    raise ConfigError(f"{flags} {verb} the checkpoint {directory} ({values}): drop the {noun} to "
                      f"use the checkpoint's architecture")


def checkpoint_model(load: str | None, step: int | None, overrides: dict[str, Any],
                     pretrained: str | None = None) -> dict[str, Any]:
    """Every field of the model sections of the checkpoint ``load``/``step`` as ``section.field``
    overrides (else of ``pretrained``'s, which a run starts from when ``load`` holds none), after
    checking the explicit ``overrides`` against them; empty when there is no checkpoint there or its manifest predates the record (the preset's model is used)."""
    directory = checkpoint_directory(load, step) or checkpoint_directory(pretrained, None)
    sections = saved_model(directory) if directory is not None else None
    if sections is None:
        return {}
    check_flags(sections, overrides, directory)
    return {f"{section}.{f.name}": getattr(value, f.name)
            for section, value in sections.items() for f in dataclasses.fields(value)}
