"""The end of a save, after this rank wrote its shards: the world agrees on failures, megatron's
finalisation writes ``.metadata``, then rank 0 adds the common state, checksums and manifest
and publishes the directory (rename, tracker, retention).

It runs on the writers' group only: in an async save it runs in the writer thread while the
training loop goes on (whose collectives use the other groups), in a sync save in the loop.
Every rank takes the same path through it (decisions follow exchanged values), so a failure is
one error, the same on every rank.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

from megatron_mimo import failpoints
from megatron_mimo.checkpoint import integrity, retention, storage
from megatron_mimo.checkpoint.coordination import Group, timed
from megatron_mimo.checkpoint.storage import describe_write_failure
from megatron_mimo.config.schema import CheckpointConfig
from megatron_mimo.errors import CheckpointError

logger = logging.getLogger(__name__)


def write_now(request: Any) -> BaseException | None:
    """Run megatron's write function of ``request`` in this thread (a sync save: no copy);
    its failure, if any."""
    try:
        if request.async_fn is not None:
            request.async_fn(*request.async_fn_args, **request.async_fn_kwargs)
    except Exception as failure:  # noqa: BLE001 - agreed on by Publisher.finish
        return failure
    return None


def first_of(messages: list[str | None]) -> str:
    """The message every rank reports for a failed save: a full disk first (its remedy is
    clear), else the first rank's."""
    found = [m for m in messages if m]
    return ([m for m in found if "disk is full" in m] or found)[0]


class Publisher:
    """Finishes the saves of --save over ``writers``; ``form`` is the format megatron-core's
    loader reads from ``metadata.json`` (what ``dist_checkpointing.save`` would write)."""

    def __init__(self, ckpt: CheckpointConfig, writers: Group, form: CheckpointingConfig) -> None:
        self.ckpt, self.writers, self.form = ckpt, writers, form
        self.root = Path(ckpt.save) if ckpt.save else None
        self.last_seconds = 0.0
        """Seconds from the start of the last published save to its publication."""

    def finish(self, iteration: int, request: Any, error: BaseException | None) -> str | None:
        """After this rank's write (or its failure): agree with every rank on failures, run the
        finalisation (megatron's, then :meth:`publish`, added to ``request`` by the save);
        return the error message, the same on every rank, or None."""
        mine = None if error is None else describe_write_failure(error, self.root, iteration)
        failed = [m for m in self.writers.exchange("checkpoint save: written", mine) if m]
        if failed:
            return first_of(failed)
        try:
            for finalise in request.finalize_fns:
                finalise()
        except CheckpointError as failure:
            return str(failure)
        except (Exception, DcpCheckpointException) as failure:  # megatron's, on every rank
            mine = describe_write_failure(failure, self.root, iteration)
            return first_of(self.writers.exchange("checkpoint save: failure", mine))
        return None

    def publish(self, iteration: int, common: dict, manifest: dict[str, Any], start: float) -> None:
        """Last finalisation step, after every rank's shards and megatron's metadata are written:
        common state, checksums, manifest, rename, tracker, retention (rank 0); the world agrees
        on the outcome so every rank fails the same way."""
        failpoints.hit("checkpoint.before_publish", rank=dist.get_rank(), iteration=iteration)
        self.writers.barrier("checkpoint save: shards written")
        error = None
        if dist.get_rank() == 0:
            try:
                with timed(self.writers.seconds, "writer.publish"):
                    self._write_and_publish(iteration, common, manifest)
            except OSError as failure:
                error = describe_write_failure(failure, self.root, iteration)
        errors = [e for e in self.writers.exchange("checkpoint save: publish", error) if e]
        if errors:
            raise CheckpointError(errors[0])
        self.last_seconds = time.perf_counter() - start
        if dist.get_rank() == 0:
            final = storage.checkpoint_dir(self.root, iteration)
            logger.info("saved checkpoint %s in %.2f s (%d bytes)", final, self.last_seconds,
                        storage.directory_bytes(final))

    def _write_and_publish(self, iteration: int, common: dict, manifest: dict[str, Any]) -> None:
        staging = storage.staging_dir(self.root, iteration)
        save_config(self.form, str(staging))
        torch.save(common, staging / "common.pt")
        sums = integrity.collect_sidecars(staging)
        unhashed = [p.name for p in staging.iterdir() if p.is_file() and p.name not in sums]
        manifest["checksums"] = {**sums, **integrity.checksums(staging, unhashed)}
        storage.write_manifest(staging, manifest)
        storage.publish(self.root, iteration)
        if self.ckpt.ckpt_keep_last:
            retention.prune(self.root, self.ckpt.ckpt_keep_last)
