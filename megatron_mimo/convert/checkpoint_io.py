"""The model part of a checkpoint, written or read by one process: what conversion and generation
need. The files are those a training run writes (same keys, manifest, checksums, tracker), so a
training run loads them at any layout and ``checkpoint verify`` checks them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.serialization
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.models.mimo import MimoModel

from megatron_mimo.checkpoint import integrity, storage
from megatron_mimo.checkpoint.contents import FORMAT
from megatron_mimo.checkpoint.reader import readers
from megatron_mimo.compat.checkpointing import read_by
from megatron_mimo.config.layout import BRANCHES
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.convert.single import SINGLE_LAYOUT
from megatron_mimo.errors import CheckpointError


def model_manifest(cfg: MimoConfig, iteration: int) -> dict[str, Any]:
    """Manifest of a weights-only checkpoint written at the one-rank-per-branch layout."""
    from megatron.core import __version__ as mcore_version

    return {"format": FORMAT, "megatron_core_version": mcore_version, "iteration": iteration,
            "optimizer_sharding_type": "dp_reshardable",
            "topology": {name: dataclasses.asdict(SINGLE_LAYOUT[name]) for name in BRANCHES},
            "world_size": len(BRANCHES), "precision": "fp32", "contents": ["model"],
            "config_name": cfg.name, "summary": {},
            "model": {"images": dataclasses.asdict(cfg.images),
                      "language": dataclasses.asdict(cfg.language)}}


@contextlib.contextmanager
def no_zip_checksum() -> Iterator[None]:
    """torch.save without its per-record CRC32: every file of the checkpoint gets our xxh3
    checksum (verified before a load), and the CRC pass is most of the write time on a CPU."""
    config = torch.utils.serialization.config.save
    before = config.compute_crc32
    config.compute_crc32 = False
    try:
        yield
    finally:
        config.compute_crc32 = before


def save_model(model: MimoModel, cfg: MimoConfig, root: Path, iteration: int = 0) -> Path:
    """Write the model's weights as checkpoint ``iteration`` of ``root`` and publish it."""
    root.mkdir(parents=True, exist_ok=True)
    staging = storage.prepare_staging(root, iteration)
    manifest = model_manifest(cfg, iteration)
    sharded = {"model": model.sharded_state_dict(), "manifest": manifest,
               "config": cfg.to_dict()}
    with no_zip_checksum():
        dist_checkpointing.save(sharded, str(staging),
                                sharded_strategy=TorchDistSaveShardedStrategy())
    names = [p.name for p in staging.iterdir() if p.is_file()]
    manifest["checksums"] = integrity.checksums(staging, names)
    storage.write_manifest(staging, manifest)
    return storage.publish(root, iteration)


def resolve(root: Path, step: int | None = None) -> Path:
    """The published checkpoint directory of ``root`` (its tracker, or ``step``)."""
    root = Path(root)
    iteration = step if step is not None else storage.read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"{root}: no checkpoint (no {storage.TRACKER_FILENAME})")
    directory = storage.checkpoint_dir(root, iteration)
    if not storage.is_complete(directory):
        raise CheckpointError(f"{directory} is missing or incomplete")
    return directory


def saved_model_config(directory: Path) -> MimoConfig:
    """The model sections a checkpoint's manifest records, as a config (other sections default)."""
    from megatron_mimo.config.from_checkpoint import saved_model

    model = saved_model(directory)
    if model is None:
        raise CheckpointError(f"{directory / storage.MANIFEST_FILENAME} does not record the model "
                              f"(saved by an older version): cannot rebuild it")
    name = storage.read_manifest(directory).get("config_name") or "custom"
    return MimoConfig(images=model["images"], language=model["language"], name=name)


def load_model(model: MimoModel, directory: Path, dtype: torch.dtype = torch.float32,
               verify: bool = True) -> None:
    """Fill a model built on the meta device with a checkpoint's weights, in ``dtype``, at
    whatever layout it was saved (dist_checkpointing reshards); nothing but the model is read."""
    metadata = None
    if verify:
        manifest = storage.read_manifest(directory)
        metadata = storage.check_files(directory)
        bad = integrity.problems(directory, manifest.get("checksums", {}),
                                 sorted(manifest.get("checksums", {})))
        if bad:
            raise CheckpointError(bad[0])
    empty = {name: torch.empty(p.shape, dtype=dtype) for name, p in model.named_parameters()}
    model.load_state_dict(empty, strict=False, assign=True)
    try:
        with read_by(readers(directory, metadata)) as strategy:
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                             str(directory), sharded_strategy=strategy)
    except Exception as error:  # noqa: BLE001 - any failure here is a bad checkpoint
        raise CheckpointError(f"{directory}: cannot load the model ({type(error).__name__}: "
                              f"{str(error)[:200]})") from error
    model.load_state_dict(loaded["model"], strict=False)
