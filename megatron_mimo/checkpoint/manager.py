"""CheckpointManager: save and load the pieces of a heterogeneous job with megatron-core's
dist_checkpointing (torch_dist), atomically.

Every rank calls :meth:`save` and :meth:`load` together. Control flow depends only on
world-agreed values; one up-front exchange on a dedicated gloo group with a bounded timeout
checks that every rank is saving the same thing, so a missing or diverging rank becomes a clear
error naming it instead of a hang.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    TorchDistLoadShardedStrategy,
    TorchDistSaveShardedStrategy,
)

from megatron_mimo.checkpoint import storage
from megatron_mimo.checkpoint.contents import (
    Contents,
    Pieces,
    apply_loaded,
    manifest_for,
    sharded_state,
)
from megatron_mimo.compat.mcore import MCORE_WORKAROUNDS
from megatron_mimo.compat.registry import apply_all
from megatron_mimo.config.schema import CheckpointConfig
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.errors import CheckpointError

logger = logging.getLogger(__name__)

FAULT_CRASH_DURING_SAVE = "MIMO_FAULT_CRASH_DURING_SAVE"
"""Test hook ``RANK:ITERATION``: that global rank exits after writing its shards of that
iteration's checkpoint, before the checkpoint is published."""


def sharded_keys(state: dict) -> list[str]:
    """Sorted unique keys of every sharded object in ``state`` (this rank's part)."""
    return sorted({v.key for v in nested_values(state) if isinstance(v, ShardedBase)})


class CheckpointManager:
    """Saves and loads ``pieces``; create it on every rank (it creates a process group).

    ``config`` is the job's full config as a plain dict (saved with every checkpoint);
    ``precision`` the training dtype ('fp32', 'bf16', 'fp16') the optimizer state belongs to."""

    def __init__(self, pieces: Pieces, topology: Topology, ckpt: CheckpointConfig,
                 config: dict[str, Any], precision: str = "fp32") -> None:
        self.pieces, self.topology, self.ckpt, self.config = pieces, topology, ckpt, config
        self.precision = precision
        self.timeout = datetime.timedelta(seconds=self.ckpt.ckpt_timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        self.save_strategy = TorchDistSaveShardedStrategy(cached_metadata=True)
        self.last_fingerprint: str | None = None
        self.last_save_seconds = self.last_load_seconds = 0.0
        self.loaded_optimizer_meta: dict[str, Any] = {}
        apply_all(MCORE_WORKAROUNDS)  # in-process save queue, Adam step on fully_reshardable load

    # -- coordination -------------------------------------------------------------------

    def _barrier(self, what: str) -> None:
        try:
            dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise CheckpointError(f"{what}: not every rank arrived within "
                                  f"{self.ckpt.ckpt_timeout_s} s ({error})") from error

    def _exchange(self, what: str, value: Any) -> list[Any]:
        """All-gather a small Python value over the checkpoint group (bounded in time)."""
        self._barrier(what)
        values: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(values, value, group=self.group)
        return values

    def _agree(self, what: str, value: Any) -> Any:
        values = self._exchange(what, value)
        if any(v != values[0] for v in values):
            by_rank = {rank: v for rank, v in enumerate(values)}
            raise CheckpointError(f"{what}: ranks disagree: {by_rank}")
        return values[0]

    def close(self) -> None:
        """Destroy the checkpoint process group."""
        dist.destroy_process_group(self.group)

    # -- save -----------------------------------------------------------------------------

    def save(self, iteration: int) -> Path:
        """Write a checkpoint of the pieces at ``iteration`` atomically; return its directory."""
        if not self.ckpt.save:
            raise CheckpointError("save() called without --save")
        start = time.perf_counter()
        root = Path(self.ckpt.save)
        contents = Contents.to_save(self.ckpt)
        self._agree("checkpoint save: iteration and optimizer sharding",
                    (iteration, contents.sharding_type))
        sharded = sharded_state(self.pieces, self.topology, contents, saving=True)
        all_keys = self._exchange("checkpoint save: sharded key set", sharded_keys(sharded))
        fingerprint = hashlib.sha256("\n".join(sorted(set().union(*all_keys))).encode()).hexdigest()
        if self.last_fingerprint not in (None, fingerprint):
            logger.warning("sharded structure changed since the last save: dropping the cached save plan")
            self.save_strategy = TorchDistSaveShardedStrategy(cached_metadata=True)
        self.last_fingerprint = fingerprint
        manifest = manifest_for(iteration, self.topology, contents, fingerprint, self.config,
                                self.precision)
        sharded["manifest"] = manifest
        sharded["config"] = self.config
        if dist.get_rank() == 0:
            storage.prepare_staging(root, iteration)
        self._barrier("checkpoint save: staging directory")
        staging = storage.staging_dir(root, iteration)
        sharded_part, common = save_preprocess(sharded, validate_access_integrity=True)
        dist_checkpointing.save(sharded_part, str(staging), sharded_strategy=self.save_strategy,
                                validate_access_integrity=False)
        self._maybe_crash_for_test(iteration)
        self._barrier("checkpoint save: shards written")
        if dist.get_rank() == 0:
            torch.save(common, staging / "common.pt")
            storage.write_manifest(staging, manifest)
            storage.publish(root, iteration)
        self._barrier("checkpoint save: publish")
        final = storage.checkpoint_dir(root, iteration)
        self.last_save_seconds = time.perf_counter() - start
        if dist.get_rank() == 0:
            logger.info("saved checkpoint %s in %.2f s (%d bytes)", final, self.last_save_seconds,
                        directory_bytes(final))
        return final

    @staticmethod
    def _maybe_crash_for_test(iteration: int) -> None:
        if os.environ.get(FAULT_CRASH_DURING_SAVE) == f"{dist.get_rank()}:{iteration}":
            logger.error("%s: exiting in the middle of a save", FAULT_CRASH_DURING_SAVE)
            os._exit(17)

    # -- load -----------------------------------------------------------------------------

    def resolve_iteration(self) -> int | None:
        """Iteration to load: --ckpt-step, else the tracker; the world agrees on the MAX."""
        if not self.ckpt.load:
            return None
        if self.ckpt.ckpt_step is not None:
            mine = self.ckpt.ckpt_step
        else:
            mine = storage.read_tracker(self.ckpt.load)
        values = self._exchange("checkpoint load: iteration", mine)
        found = [v for v in values if v is not None]
        if len(set(values)) > 1:
            logger.warning("ranks read different iterations to load %s; using the largest", values)
        return max(found) if found else None

    def load(self) -> int | None:
        """Load the checkpoint chosen by --load/--ckpt-step into the pieces; return its iteration,
        or None when there is nothing to load. With --finetune only the weights are loaded."""
        iteration = self.resolve_iteration()
        if iteration is None:
            if self.ckpt.load:
                logger.info("no checkpoint found in %s: starting from scratch", self.ckpt.load)
            return None
        start = time.perf_counter()
        directory = storage.checkpoint_dir(self.ckpt.load, iteration)
        if not storage.is_complete(directory):
            raise CheckpointError(f"{directory} is missing or incomplete (no metadata.json or "
                                  f"{storage.MANIFEST_FILENAME})")
        manifest = storage.read_manifest(directory)
        self._check_manifest(manifest, directory)
        storage.check_files(directory)
        contents = Contents.to_load(self.ckpt, manifest, self.topology, self.precision)
        template = sharded_state(self.pieces, self.topology, contents, saving=False)
        try:
            loaded = dist_checkpointing.load(template, str(directory),
                                             sharded_strategy=TorchDistLoadShardedStrategy(),
                                             validate_access_integrity=True)
        except Exception as error:  # noqa: BLE001 - any failure here is a bad checkpoint
            raise CheckpointError(f"{directory}: cannot load ({type(error).__name__}: "
                                  f"{str(error)[:200]})") from error
        apply_loaded(self.pieces, loaded, contents, self.topology.my_branch)
        self.loaded_optimizer_meta = optimizer_meta(loaded.get("optimizer", {}))
        self._barrier("checkpoint load: done")
        self.last_load_seconds = time.perf_counter() - start
        if dist.get_rank() == 0:
            logger.info("loaded checkpoint %s (iteration %d) in %.2f s", directory, iteration,
                        self.last_load_seconds)
        return iteration

    def _check_manifest(self, manifest: dict[str, Any], directory: Path) -> None:
        """Warn on a megatron-core version change; log a world-size change (resharding)."""
        from megatron.core import __version__ as mcore_version

        if manifest["megatron_core_version"] != mcore_version and dist.get_rank() == 0:
            logger.warning("%s was saved by megatron-core %s, this is %s", directory,
                           manifest["megatron_core_version"], mcore_version)
        if manifest["world_size"] != self.topology.world_size and dist.get_rank() == 0:
            logger.info("%s was saved by %d ranks, this job has %d: resharding", directory,
                        manifest["world_size"], self.topology.world_size)


def optimizer_meta(optimizer_sd: dict) -> dict[str, Any]:
    """Per-branch non-tensor optimizer state as loaded (param groups, sharding type)."""
    meta = {}
    for branch, module_sd in optimizer_sd.items():
        if not isinstance(module_sd, dict) or "optimizer" not in module_sd:
            continue
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in module_sd["optimizer"].get("param_groups", [])]
        meta[branch] = {"param_groups": groups,
                        "param_state_sharding_type": module_sd.get("param_state_sharding_type")}
    return meta


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
