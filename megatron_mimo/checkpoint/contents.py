"""What a checkpoint holds: the stateful pieces under fixed keys, which of them a save writes or
a load reads, and how they become one sharded state dict (and back).

    model         both branches' weights (MimoModel keys: unique per branch)
    optimizer     MimoOptimizer state, 'mimo.<branch>.'-prefixed; param_groups, grad scaler and
                  param_state_sharding_type as ShardedObjects with the branch's (tp, pp, dp)
    scheduler     one OptimizerParamScheduler state per branch
    data          this rank's data state (position; Energon loader state with its record),
                  one object per rank; loaded only under the saved layout
    events        per-branch skip history: always present (empty when idle), so the sharded
                  structure is the same in every save (a cached save plan never drops it)
    rng           python, numpy, torch CPU, CUDA, tracker streams, one object per global rank
    train_state   iteration, consumed samples/tokens, FLOPs, skips (world-wide, common)
    config        the full config (common)

Every rank derives the same :class:`Contents` from the flags and the manifest, so every rank
runs the same collectives.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_mimo.checkpoint.rng import capture_rng, restore_rng
from megatron_mimo.compat.mcore import (
    apply_wrapper_free_keys,
    ensure_adam_state,
    load_scheduler_state,
    rebuild_adam_steps,
)
from megatron_mimo.config.layout import ParallelismConfig
from megatron_mimo.config.schema import CheckpointConfig
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.errors import CheckpointError
from megatron_mimo.models.freezing import FLAGS as FREEZE_FLAGS

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` of plain types."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataState(Stateful, Protocol):
    """A rank's data state, which can also continue without its saved state (new layout)."""

    def restart_at(self, consumed_samples: int) -> None: ...


@dataclass
class Pieces:
    """The stateful objects a checkpoint saves, one field per fixed key."""

    model: Any
    """MimoModel of this rank (``sharded_state_dict`` / ``load_state_dict``)."""
    optimizer: Any
    """megatron-core MimoOptimizer."""
    schedulers: dict[str, Any]
    """One OptimizerParamScheduler per branch; only this rank's branch's drives an optimizer."""
    data: DataState
    """This rank's data state (saved per rank)."""
    events: Stateful
    """Skip history."""
    train_state: Stateful
    """World-wide progress (saved as common state)."""


@dataclass(frozen=True)
class Contents:
    """Which pieces a save writes or a load reads."""

    optimizer: bool
    scheduler: bool
    rng: bool
    progress: bool
    """Train state, data position and skip history (off with --finetune)."""
    sharding_type: str
    rank_data: bool = True
    """This rank's saved data state; off when the layout changed (each rank then continues at
    the train state's consumed samples, if its data source can)."""

    @classmethod
    def to_save(cls, ckpt: CheckpointConfig) -> Contents:
        """What a save writes under these flags."""
        return cls(optimizer=not ckpt.no_save_optim, scheduler=True, rng=not ckpt.no_save_rng,
                   progress=True, sharding_type=ckpt.optimizer_sharding_type)

    @classmethod
    def to_load(cls, ckpt: CheckpointConfig, manifest: dict[str, Any], topology: Topology,
                precision: str) -> Contents:
        """What a load reads: the flags, limited by what the checkpoint holds and the layout."""
        saved = set(manifest["contents"])
        optimizer = not (ckpt.finetune or ckpt.no_load_optim)
        if optimizer and "optimizer" not in saved:
            raise CheckpointError("the checkpoint holds no optimizer state (saved with "
                                  "--no-save-optim): resume with --no-load-optim or --finetune")
        saved_precision = manifest.get("precision", "fp32")
        if optimizer and saved_precision != precision:
            flag = "no --bf16/--fp16" if saved_precision == "fp32" else f"--{saved_precision}"
            raise CheckpointError(
                f"the checkpoint was trained in {saved_precision} and this run trains in "
                f"{precision}: its optimizer state belongs to {saved_precision}; resume with "
                f"{flag}, or load the weights only (--finetune / --no-load-optim)")
        check_layout(manifest, topology, optimizer)
        same_ranks = all(_saved_parallel(manifest, name) == topology.spec(name).parallel
                         for name in topology.branches)
        rng = not (ckpt.finetune or ckpt.no_load_rng) and "rng" in saved
        if rng and not same_ranks:
            logger.warning("layout changed since the save: RNG state is per rank and is not loaded")
            rng = False
        if not same_ranks and not ckpt.finetune:
            logger.warning("layout changed since the save: the data state is per rank and is not "
                           "loaded; the data continues at the saved consumed samples if it can")
        return cls(optimizer=optimizer, scheduler=not (ckpt.finetune or ckpt.no_load_scheduler),
                   rng=rng, progress=not ckpt.finetune,
                   sharding_type=manifest["optimizer_sharding_type"], rank_data=same_ranks)

    def names(self) -> list[str]:
        """Keys of the sharded state dict these contents produce."""
        return ["model"] + [name for name, on in (
            ("optimizer", self.optimizer), ("scheduler", self.scheduler),
            ("data", self.progress and self.rank_data),
            ("events", self.progress), ("rng", self.rng)) if on]


def _saved_parallel(manifest: dict[str, Any], branch: str) -> ParallelismConfig:
    return ParallelismConfig(**manifest["topology"][branch])


def check_layout(manifest: dict[str, Any], topology: Topology, loads_optimizer: bool) -> None:
    """Refuse, before any collective, a resume the saved world cannot map to."""
    saved_branches, branches = sorted(manifest["topology"]), sorted(topology.branches)
    if saved_branches != branches:
        raise CheckpointError(f"the checkpoint holds branches {saved_branches}, this job has "
                              f"{branches}")
    for branch in branches:
        saved, now = _saved_parallel(manifest, branch).spec(branch), topology.spec(branch)
        model_parallel_changed = (saved.tp, saved.pp) != (now.tp, now.pp)
        if (loads_optimizer and model_parallel_changed
                and manifest["optimizer_sharding_type"] != "fully_reshardable"):
            raise CheckpointError(
                f"cannot resume the {branch} branch: the checkpoint was saved with "
                f"{saved.describe()} and optimizer format '{manifest['optimizer_sharding_type']}', "
                f"which reshards only across DP; this run uses {now.describe()}. Resume with the "
                f"saved TP/PP, save with --dist-ckpt-optim-fully-reshardable, or load weights "
                f"only (--no-load-optim / --finetune)")


def replica_id(pgs) -> tuple[int, int, int]:
    """(tp, pp, dp) rank in the branch: only (0, 0, 0) writes a per-branch object."""
    return (pgs.tp.rank(), pgs.pp.rank(), pgs.dp.rank())


def branch_object(key: str, data: Any, pgs, foreign: bool = False) -> ShardedObject:
    """One object per branch, written by the branch's first rank, read by all its ranks.

    ``foreign``: another branch's object this rank only reads (never a main replica)."""
    rid = replica_id(pgs)
    return ShardedObject(key, data, (1,), (0,), replica_id=(1, *rid) if foreign else rid)


def rank_object(key: str, data: Any, local_rank: int, branch_size: int) -> ShardedObject:
    """One object per rank of a branch (e.g. RNG): shard ``local_rank`` of ``branch_size``."""
    return ShardedObject(key, data, (branch_size,), (local_rank,), replica_id=0)


def inner_optimizers(mimo_optimizer) -> list:
    """The DistributedOptimizers of this rank's branch (a ChainedOptimizer is unrolled)."""
    result = []
    for info in mimo_optimizer.module_infos.values():
        if info.is_active and info.optimizer is not None:
            result += list(getattr(info.optimizer, "chained_optimizers", [info.optimizer]))
    return result


def sharded_state(pieces: Pieces, topology: Topology, contents: Contents,
                  saving: bool) -> dict[str, Any]:
    """This rank's sharded state dict: what a save writes, or the template a load fills."""
    branch, pgs = topology.my_branch, topology.pgs()
    spec = topology.spec(branch)
    model_sd = apply_wrapper_free_keys(pieces.model.sharded_state_dict())
    sharded: dict[str, Any] = {"model": model_sd}
    if contents.optimizer:
        for optimizer in inner_optimizers(pieces.optimizer):
            ensure_adam_state(optimizer)
        sharded["optimizer"] = pieces.optimizer.sharded_state_dict(
            model_sd, is_loading=not saving,
            metadata={"distrib_optim_sharding_type": contents.sharding_type})
    if contents.scheduler:  # a save writes this branch's; a load reads every branch's (for logging)
        names = [branch] if saving else list(pieces.schedulers)
        sharded["scheduler"] = {name: branch_object(
            f"scheduler.{name}", pieces.schedulers[name].state_dict(), pgs,
            foreign=name != branch) for name in names}
    local_rank = topology.rank - spec.rank_offset
    if contents.progress:
        if contents.rank_data:
            sharded["data"] = rank_object(f"data.{branch}", pieces.data.state_dict(), local_rank,
                                          spec.num_ranks)
        sharded["events"] = branch_object(f"events.{branch}", pieces.events.state_dict(), pgs)
    if contents.rng:
        sharded["rng"] = rank_object(f"rng.{branch}", capture_rng(), local_rank, spec.num_ranks)
    if saving:
        sharded["train_state"] = pieces.train_state.state_dict()
    return sharded


def apply_loaded(pieces: Pieces, loaded: dict[str, Any], contents: Contents, branch: str) -> None:
    """Install a loaded state dict into the pieces (RNG last: after every seeding step)."""
    pieces.model.load_state_dict(loaded["model"], strict=True)
    if contents.optimizer:
        with torch.no_grad():  # the load copies into views of leaf params
            pieces.optimizer.load_state_dict(loaded["optimizer"])
        for optimizer in inner_optimizers(pieces.optimizer):
            rebuild_adam_steps(optimizer)
    else:
        rederive_main_params(pieces.optimizer)
    if contents.scheduler:
        _load_schedulers(pieces.schedulers, loaded["scheduler"], branch)
    if contents.progress:
        pieces.train_state.load_state_dict(loaded["train_state"])
        if contents.rank_data:
            pieces.data.load_state_dict(loaded["data"])
        else:
            pieces.data.restart_at(loaded["train_state"]["consumed_samples"])
        pieces.events.load_state_dict(loaded["events"])
    if contents.rng:
        restore_rng(loaded["rng"])


def rederive_main_params(mimo_optimizer) -> None:
    """Copy the loaded weights into the optimizer's main parameters (no optimizer state loaded).

    In bf16/fp16 the fp32 main parameters are separate tensors: without this the next step would
    write the pre-load main parameters back over the loaded weights. (In fp32 they are views of
    the weights and this copies nothing new.)"""
    optimizers = inner_optimizers(mimo_optimizer)
    for optimizer in optimizers:
        optimizer.reload_model_params()
    if any(getattr(o.config, "bf16", False) or getattr(o.config, "fp16", False) for o in optimizers):
        logger.info("optimizer state not loaded: fp32 main parameters re-derived from the loaded "
                    "16-bit weights")


def _load_schedulers(schedulers: dict[str, Any], states: dict[str, dict[str, Any]],
                     branch: str) -> None:
    """Restore every branch's scheduler (this rank's is real, the others drive LR logging)."""
    for name, scheduler in schedulers.items():
        saved = states[name]
        changed = {k: (v, saved[k]) for k, v in scheduler.state_dict().items()
                   if k != "num_steps" and saved.get(k) != v}
        if changed and name == branch:
            logger.warning("%s LR schedule: the checkpoint's values win over the flags: %s "
                           "(flag value, checkpoint value)", name, changed)
        load_scheduler_state(scheduler, saved)


FORMAT = "megatron-mimo/3"
"""Checkpoint format version written into the manifest: /2 keeps the data state as one object
per rank, /3 the images branch's norms under Transformer Engine's names. Bump it whenever a
piece moves to another key."""


def summary(pieces: Pieces) -> dict[str, Any]:
    """What ``megatron-mimo checkpoint inspect`` shows without reading shards: the progress
    and every branch's LR schedule position (every rank steps every branch's scheduler)."""
    schedulers = {name: {"num_steps": s.num_steps, "lr": s.get_lr(s.optimizer.param_groups[0])}
                  for name, s in pieces.schedulers.items()}
    return {"train_state": pieces.train_state.state_dict(), "schedulers": schedulers}


def manifest_for(iteration: int, topology: Topology, contents: Contents, fingerprint: str,
                 config: dict[str, Any], precision: str,
                 progress: dict[str, Any]) -> dict[str, Any]:
    """Small description of a checkpoint, identical on every rank (common state + JSON file).

    ``model`` records the model sections of ``config`` (``audio`` only with an audio branch) so
    that a run loading the checkpoint builds the architecture its weights belong to without
    repeating the model flags."""
    from megatron.core import __version__ as mcore_version

    return {
        "format": FORMAT, "megatron_core_version": mcore_version, "iteration": iteration,
        "optimizer_sharding_type": contents.sharding_type,
        "topology": {name: dataclasses.asdict(topology.spec(name).parallel)
                     for name in topology.branches},
        "world_size": topology.world_size, "sharded_keys_fingerprint": fingerprint,
        "precision": precision,
        "contents": sorted(contents.names()), "config_name": config.get("name"),
        "summary": progress,
        "model": model_sections(config),
        "frozen": frozen_modules(config),
    }


def model_sections(config: dict[str, Any]) -> dict[str, Any]:
    """The model sections of a plain config dict that the weights depend on."""
    audio = ("audio",) if config.get("audio_parallel") is not None else ()
    return {section: config[section] for section in ("images", "language", *audio)}




def frozen_modules(config: dict[str, Any]) -> list[str]:
    """The modules a run with ``config`` (a plain config dict) keeps frozen, in a fixed order."""
    training = config.get("training", {})
    return [module for module, field in FREEZE_FLAGS.items() if training.get(field)]


def check_trainable(manifest: dict[str, Any], frozen: list[str], loads_optimizer: bool) -> None:
    """Optimizer state belongs to the set of parameters it trained: resuming it under another
    set would pair moments with the wrong parameters (or none), so it is refused in one line;
    a new stage loads the weights only (``--finetune``: a fresh optimizer for the new set)."""
    saved = manifest.get("frozen", [])  # a manifest older than the record trained everything
    if not loads_optimizer or saved == frozen:
        return

    def describe(modules: list[str]) -> str:
        return "frozen " + ", ".join(modules) if modules else "nothing frozen"

    flags = " ".join(f"--freeze-{m}" for m in saved) or "no --freeze-* flag"
    raise CheckpointError(f"the checkpoint was trained with {describe(saved)}, this run has "
                          f"{describe(frozen)}: its optimizer state belongs to the other set; "
                          f"resume with {flags}, or start the new stage with --finetune")


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
