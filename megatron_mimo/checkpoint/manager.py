"""CheckpointManager: save and load the pieces of a heterogeneous job with megatron-core's
dist_checkpointing (torch_dist), atomically.

Every rank calls :meth:`save` and :meth:`load` together. Control flow depends only on
world-agreed values; one up-front exchange on a dedicated gloo group with a bounded timeout
checks that every rank is saving the same thing, so a missing or diverging rank becomes a clear
error naming it instead of a hang.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingConfig
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

from megatron_mimo import failpoints
from megatron_mimo.checkpoint import integrity, storage
from megatron_mimo.checkpoint.background import BackgroundSaves, with_checksums
from megatron_mimo.checkpoint.contents import (
    Contents,
    Pieces,
    apply_loaded,
    check_trainable,
    frozen_modules,
    manifest_for,
    optimizer_meta,
    sharded_state,
    summary,
)
from megatron_mimo.checkpoint.coordination import Group, timed
from megatron_mimo.checkpoint.publish import Publisher, write_now
from megatron_mimo.checkpoint.reader import readers
from megatron_mimo.compat import apply_process_workarounds
from megatron_mimo.compat.checkpointing import read_by, save_strategy_finalised_on
from megatron_mimo.compat.mcore import views_saved_without_copy
from megatron_mimo.config.schema import CheckpointConfig
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.errors import CheckpointError

logger = logging.getLogger(__name__)

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
        self.seconds: dict[str, float] = collections.defaultdict(float)
        """Time this rank spent per phase (cumulative): 'blocked' is the training loop's stall
        inside save/hold/poll/wait; 'state', 'keys', 'prepare', 'plan', 'write', 'start', 'hold',
        'poll', 'barrier', 'gather' split the saves (the writer thread's own collectives and
        publishing are 'writer.*'), 'load.*' the loads."""
        self.coordination = Group(ckpt.ckpt_timeout_s, self.seconds)
        self.writers = Group(ckpt.ckpt_timeout_s, self.seconds, prefix="writer.")
        self.group = self.coordination.pg
        self.save_strategy = save_strategy_finalised_on(self.writers.pg)
        self.publisher = Publisher(ckpt, self.writers, CheckpointingConfig(
            self.save_strategy.backend, self.save_strategy.version))
        self.background = BackgroundSaves(self.group) if ckpt.async_save else None
        self.pending_iteration: int | None = None
        self.finished_by_wait: list[int] = []
        """Async saves whose writing the loop had to wait for (at exit or at the next save)."""
        self.last_fingerprint: str | None = None
        self.loaded_from: CheckpointConfig | None = None
        """Flags of the last load (--pretrained-checkpoint's has --finetune on)."""
        self.last_load_seconds = 0.0
        self.loaded_optimizer_meta: dict[str, Any] = {}
        apply_process_workarounds(cpu=False)  # save queue, Adam step on a resharding load
        if ckpt.save and dist.get_rank() == 0:
            removed = storage.remove_stale(ckpt.save)
            if removed:
                logger.info("removed leftovers of interrupted saves in %s: %s", ckpt.save, removed)

    @property
    def last_save_seconds(self) -> float:
        """Seconds the last published save took, from its start to its publication."""
        return self.publisher.last_seconds

    def _timed(self, phase: str):
        return timed(self.seconds, phase)

    def close(self, abort: bool = False) -> None:
        """Finish the pending save (after a failure: forget it), drop the groups."""
        writing = self.background is not None and self.background.pending
        if self.background is not None:
            if abort:
                self.background.abort()
            else:
                self.wait()
                self.background.close()
        self.coordination.destroy()
        if not (abort and writing):  # a writer thread may still be inside a collective there
            self.writers.destroy()

    # -- save -----------------------------------------------------------------------------

    def save(self, iteration: int) -> Path:
        """Write a checkpoint of the pieces at ``iteration`` atomically; return its directory.

        With --async-save the shards are written in the background and the directory appears
        once every rank finished (see :meth:`poll`); a save still pending is finished first."""
        if not self.ckpt.save:
            raise CheckpointError("save() called without --save")
        self.wait()
        with self._timed("blocked"):
            return self._save(iteration)

    def _save(self, iteration: int) -> Path:
        start = time.perf_counter()
        root = Path(self.ckpt.save)
        contents = Contents.to_save(self.ckpt)
        with self._timed("state"):
            sharded = sharded_state(self.pieces, self.topology, contents, saving=True)
        if dist.get_rank() == 0:  # before the exchange, which every other rank waits in
            storage.prepare_staging(root, iteration)
        first_of_structure = self._track_structure(sharded, (iteration, contents.sharding_type))
        manifest = manifest_for(iteration, self.topology, contents, self.last_fingerprint,
                                self.config, self.precision, summary(self.pieces))
        sharded["manifest"] = manifest
        sharded["config"] = self.config
        plan = partial(self._plan, sharded, iteration, first_of_structure, manifest, start)
        finish = partial(self.publisher.finish, iteration)
        if self.background is None:
            request = plan()
            with self._timed("write"):  # and the finalisation and our publish
                outcome = finish(request, write_now(request))
            self._completed(outcome)
            return storage.checkpoint_dir(root, iteration)
        if first_of_structure or not self._plan_is_cached():  # planning gathers over the world
            planned = plan()
            plan = lambda: planned  # noqa: E731
        with self._timed("start"):  # the writer thread: (plan,) copy, write, finalise
            self.background.start(plan, finish, iteration)
        self.pending_iteration = iteration
        failpoints.hit("checkpoint.write_in_flight", rank=dist.get_rank(), iteration=iteration)
        return storage.checkpoint_dir(root, iteration)

    def _plan_is_cached(self) -> bool:
        """megatron's next plan reuses the cached one: no collective, so the writer thread may
        make it (only tensor metadata is read; values are copied before :meth:`hold` returns)."""
        strategy = self.save_strategy
        return bool(strategy.validated_cache_reuse and strategy.cached_central_plan is not None)

    def _plan(self, sharded: dict[str, Any], iteration: int, first_of_structure: bool,
              manifest: dict[str, Any], start: float) -> Any:
        """megatron's save request for ``sharded``: its write function and buckets, its
        finalisation (on the writers' group), then :meth:`Publisher.publish`."""
        staging = storage.staging_dir(self.ckpt.save, iteration)
        with self._timed("prepare"):
            sharded_part, common = save_preprocess(sharded,
                                                   validate_access_integrity=first_of_structure)
            views_saved_without_copy(sharded_part)
            sharded_part["common_state"] = ShardedObject(  # as dist_checkpointing.save does
                "common_state", {}, (1,), (0,), replica_id=dist.get_rank())
        with self._timed("plan"):
            request = self.save_strategy.async_save(sharded_part, staging, async_strategy="mcore")
        request = with_checksums(request, staging, iteration, self.seconds)
        request.add_finalize_fn(partial(self.publisher.publish, iteration, common, manifest, start))
        return request

    def _track_structure(self, sharded: dict[str, Any], agreed: tuple) -> bool:
        """The one exchange before a save: the world agrees on ``agreed`` (iteration, optimizer
        sharding), learns that rank 0 made the staging directory, and fingerprints its sharded
        key set; True when the set is new (first save, or changed: then the cached save plan
        is dropped and the access pattern validated again)."""
        with self._timed("keys"):
            mine = hashlib.sha256("\n".join(sharded_keys(sharded)).encode()).hexdigest()
        values = self.coordination.exchange("checkpoint save: iteration and key set", (agreed, mine))
        if any(v[0] != values[0][0] for v in values):
            by_rank = {rank: v[0] for rank, v in enumerate(values)}
            raise CheckpointError(f"checkpoint save: iteration and optimizer sharding: ranks "
                                  f"disagree: {by_rank}")
        fingerprint = hashlib.sha256("\n".join(v[1] for v in values).encode()).hexdigest()
        changed = self.last_fingerprint not in (None, fingerprint)
        if changed:
            logger.warning("sharded structure changed since the last save: dropping the cached save plan")
            self.save_strategy = save_strategy_finalised_on(self.writers.pg)
        new = self.last_fingerprint != fingerprint
        self.last_fingerprint = fingerprint
        return new

    def _completed(self, outcome: str | None) -> None:
        """The loop's side of a finished save: nothing pending; its agreed error raised."""
        self.pending_iteration = None
        if outcome is not None:
            raise CheckpointError(outcome)

    def poll(self) -> None:
        """Finish the pending async save once every rank's writer is done (call every iteration
        on every rank: one small all-reduce, started a step earlier, while a save is pending)."""
        if self.background is not None and self.background.pending:
            with self._timed("blocked"), self._timed("poll"):
                if self.background.poll():
                    self._completed(self.background.outcome)

    def hold(self) -> None:
        """Block until the pending async save (if any) holds its copy of this rank's tensors;
        the training calls it before every update of the parameters or optimizer state."""
        if self.background is not None and self.background.pending:
            with self._timed("blocked"), self._timed("hold"):
                self.background.hold()

    def wait(self) -> None:
        """Block until the pending async save (if any) is written and published."""
        if self.background is not None and self.background.pending:
            logger.info("waiting for the checkpoint of iteration %d to be written",
                        self.pending_iteration)
            self.finished_by_wait.append(self.pending_iteration)
            with self._timed("blocked"):
                self.background.wait()
                self._completed(self.background.outcome)

    # -- load -----------------------------------------------------------------------------

    def resolve_iteration(self, ckpt: CheckpointConfig | None = None) -> int | None:
        """Iteration to load: --ckpt-step, else the tracker; the world agrees on the MAX."""
        ckpt = ckpt or self.ckpt
        if not ckpt.load:
            return None
        if ckpt.ckpt_step is not None:
            mine = ckpt.ckpt_step
        else:
            mine = storage.read_tracker(ckpt.load)
        values = self.coordination.exchange("checkpoint load: iteration", mine)
        found = [v for v in values if v is not None]
        if len(set(values)) > 1:
            logger.warning("ranks read different iterations to load %s; using the largest", values)
        return max(found) if found else None

    def load(self) -> int | None:
        """Load the checkpoint chosen by --load/--ckpt-step into the pieces; return its iteration,
        or None when there is nothing to load. With --finetune only the weights are loaded."""
        ckpt, iteration = self._source()
        if iteration is None:
            if self.ckpt.load:
                logger.info("no checkpoint found in %s: starting from scratch", self.ckpt.load)
            return None
        start = time.perf_counter()
        directory = storage.checkpoint_dir(ckpt.load, iteration)
        if not storage.is_complete(directory):
            raise CheckpointError(f"{directory} is missing or incomplete (no metadata.json or "
                                  f"{storage.MANIFEST_FILENAME})")
        with self._timed("load.check"):
            manifest = storage.read_manifest(directory)
            self._check_manifest(manifest, directory)
            metadata = storage.check_files(directory)
        verifying = None if self.ckpt.no_ckpt_verify else self._verification(directory, manifest)
        with self._timed("load.plan"):
            contents = Contents.to_load(ckpt, manifest, self.topology, self.precision)
            check_trainable(manifest, frozen_modules(self.config), contents.optimizer)
            template = sharded_state(self.pieces, self.topology, contents, saving=False)
        loaded, failure = None, None
        with self._timed("load.read"), read_by(readers(directory, metadata)) as strategy:
            try:
                loaded = dist_checkpointing.load(template, str(directory),
                                                 sharded_strategy=strategy,
                                                 validate_access_integrity=True)
            except Exception as error:  # noqa: BLE001 - any failure here is a bad checkpoint
                failure = (f"{directory}: cannot load ({type(error).__name__}: "
                           f"{str(error)[:200]})")
        with self._timed("load.verify"):  # before anything is applied
            self._agree_on_files(verifying, failure)
        with self._timed("load.apply"):
            apply_loaded(self.pieces, loaded, contents, self.topology.my_branch)
        self.loaded_optimizer_meta = optimizer_meta(loaded.get("optimizer", {}))
        self.last_load_seconds = time.perf_counter() - start
        if dist.get_rank() == 0:
            logger.info("loaded checkpoint %s (iteration %d) in %.2f s", directory, iteration,
                        self.last_load_seconds)
        self._carry_sidecar(Path(ckpt.load))
        self.loaded_from = ckpt
        return iteration

    def _source(self) -> tuple[CheckpointConfig, int | None]:
        """What to load: --load's checkpoint, else --pretrained-checkpoint's, weights only."""
        iteration = self.resolve_iteration()
        pretrained = self.ckpt.pretrained_checkpoint
        if iteration is not None or not pretrained:
            return self.ckpt, iteration
        ckpt = dataclasses.replace(self.ckpt, load=pretrained, ckpt_step=None, finetune=True)
        iteration = self.resolve_iteration(ckpt)
        if iteration is None:
            raise CheckpointError(f"--pretrained-checkpoint {pretrained} holds no checkpoint "
                                  f"(no {storage.TRACKER_FILENAME})")
        return ckpt, iteration

    def _carry_sidecar(self, load: Path) -> None:
        """Copy the loaded root's ``hf/`` side files to --save (rank 0), so the checkpoints this
        run writes can be exported too; the world agrees on a failure (one error everywhere)."""
        if not self.ckpt.save:
            return
        save = Path(self.ckpt.save)
        if save.resolve() == load.resolve():
            return
        error = None
        if dist.get_rank() == 0:
            try:
                if storage.carry_sidecar(load, save):
                    logger.info("copied %s to %s", load / storage.SIDECAR_DIRNAME, save)
            except OSError as failure:
                error = (f"cannot copy {load / storage.SIDECAR_DIRNAME} to {save} "
                         f"({type(failure).__name__}: {failure})")
        errors = [e for e in self.coordination.exchange("checkpoint load: hf side files", error) if e]
        if errors:
            raise CheckpointError(errors[0])

    def _verification(self, directory: Path,
                      manifest: dict[str, Any]) -> integrity.Verification | None:
        """Start checking this rank's share of the files against the manifest's checksums (each
        file is read by one rank), in a thread: the shards are read meanwhile."""
        expected = manifest.get("checksums")
        if expected is None:
            if dist.get_rank() == 0:
                logger.warning("%s has no checksums (saved before they were added): not verified",
                               directory)
            return None
        mine = integrity.share(integrity.by_size(expected), dist.get_rank(), dist.get_world_size())
        return integrity.Verification(directory, expected, mine)

    def _agree_on_files(self, verifying: integrity.Verification | None,
                        failure: str | None) -> None:
        """The world agrees on the checksum problems and read failures of every rank; one error
        naming the first damaged file (else the first failed read), on every rank."""
        found = [] if verifying is None else verifying.result()
        every = self.coordination.exchange("checkpoint load: checksums", (found, failure))
        found = sum((problems for problems, _ in every), [])
        if found:
            more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
            raise CheckpointError(f"{found[0]}{more}; pass --no-ckpt-verify to load it anyway")
        failures = [failed for _, failed in every if failed]
        if failures:
            raise CheckpointError(failures[0])

    def _check_manifest(self, manifest: dict[str, Any], directory: Path) -> None:
        """Warn on a megatron-core version change; log a world-size change (resharding)."""
        from megatron.core import __version__ as mcore_version

        if manifest["megatron_core_version"] != mcore_version and dist.get_rank() == 0:
            logger.warning("%s was saved by megatron-core %s, this is %s", directory,
                           manifest["megatron_core_version"], mcore_version)
        if manifest["world_size"] != self.topology.world_size and dist.get_rank() == 0:
            logger.info("%s was saved by %d ranks, this job has %d: resharding", directory,
                        manifest["world_size"], self.topology.world_size)

