"""Checkpoint worlds that break things: structure, mismatches, crashes, damaged files, full disks.

Modes (args["mode"]):
  "features"  uneven DP3 optimizer shards, constant structure with optional state, mismatches
  "crash"     train with a save every iteration while a rank dies inside one save
  "corrupt"   load damaged copies of one checkpoint (truncated shard, garbage metadata, ...)
  "disk_full" save to a small filesystem until it is full
Each mode returns one dataclass below (:mod:`tests.workers.contract`): a field the test reads
under another name fails at once instead of deep inside an assertion.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tests.workers.ckpt_layouts import TWO_RANKS, UNEVEN, make_cfg
from tests.workers.ckpt_world import Run, exact
from tests.workers.common import forbid_parallel_state_groups, worker_main


@dataclass
class Shard:
    """One rank's optimizer shard: its branch and number of parameters."""

    branch: str
    size: int


@dataclass
class SaveAttempt:
    """A save expected to fail: the error (type: message), or skipped on the absent rank."""

    error: str | None = None
    seconds: float | None = None
    skipped: bool = False


@dataclass
class Reloaded:
    """The features checkpoint loaded in a new run."""

    iteration: int
    skipped_at: list[int]
    eval: float


@dataclass
class Features:
    """Mode "features" on one rank."""

    shards: list[Shard]
    """Every rank's optimizer shard, rank order (the same list on every rank)."""
    fingerprints: list[str]
    """Sharded key-set fingerprints of the two saves (without and with skip history)."""
    eval_at_save: float
    reloaded: Reloaded
    mismatch: SaveAttempt
    """The last rank saves another iteration than the others."""
    missing: SaveAttempt
    """The last rank never arrives at the save."""


@dataclass
class Crashed:
    """Mode "crash" on one rank (only when the world was not killed by a failpoint)."""

    start: int
    """Iteration the run resumed from."""
    records: list[dict]
    """exact() of every iteration trained."""


@dataclass
class LoadAttempt:
    """A load of a damaged checkpoint: the error's type and message (None when it loaded)."""

    type: str | None
    error: str | None


@dataclass
class Corrupt:
    """Mode "corrupt" on one rank."""

    kept: list[str]
    """What retention left in the save directory after three saves."""
    loads: dict[str, LoadAttempt]
    """By name of the damage (:data:`CORRUPTIONS`)."""


@dataclass
class FullSave:
    """A save to a full disk: the error, then the tracker and leftovers it left."""

    type: str | None
    error: str | None
    seconds: float | None
    tracker: int | None
    leftovers: list[str]


@dataclass
class DiskFull:
    """Mode "disk_full" on one rank."""

    attempts: dict[str, FullSave]
    """"sync" and "async"."""
    leftovers_at_start: list[list[str]]
    """``.tmp_*`` entries when each attempt's manager was created."""
    leftovers_at_last_start: list[str]


def mode_features(args: dict) -> Features:
    root = args["root"]
    run = Run(make_cfg(UNEVEN, {"checkpoint.save": root, "checkpoint.ckpt_timeout_s": 5}))
    shard = sum(p.numel() for opt_group in run.job.optimizer.param_groups for p in opt_group["params"])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (run.job.branch, shard))
    run.step()
    run.save()
    first = run.manager.last_fingerprint
    run.step(inject_found_inf=True)  # optional state (skip history) becomes non-empty
    run.save()
    fingerprints = [first, run.manager.last_fingerprint]
    eval_at_save = run.eval_loss()
    run.close()
    reload = Run(make_cfg(UNEVEN, {"checkpoint.load": root, "checkpoint.save": root + "_again",
                                   "checkpoint.ckpt_timeout_s": 5}))
    reload.load()
    reloaded = Reloaded(reload.state.iteration, list(reload.state.skipped_at), reload.eval_loss())
    return Features(shards=[Shard(branch, size) for branch, size in gathered],
                    fingerprints=fingerprints, eval_at_save=eval_at_save, reloaded=reloaded,
                    mismatch=_save_error(reload, bump_iteration_on_rank=dist.get_world_size() - 1),
                    missing=_save_error(reload, skip_on_rank=dist.get_world_size() - 1))


def _save_error(run: Run, bump_iteration_on_rank: int | None = None,
                skip_on_rank: int | None = None) -> SaveAttempt:
    rank = dist.get_rank()
    if rank == skip_on_rank:
        time.sleep(run.cfg.checkpoint.ckpt_timeout_s + 5)  # busy elsewhere, never saves
        return SaveAttempt(skipped=True)
    iteration = run.state.iteration + (rank == bump_iteration_on_rank)
    start = time.monotonic()
    try:
        run.manager.save(iteration)
        return SaveAttempt()
    except Exception as error:  # noqa: BLE001
        return SaveAttempt(f"{type(error).__name__}: {error}", time.monotonic() - start)


def mode_crash(args: dict) -> Crashed:
    """Save every iteration (one rank dies inside a save when a failpoint says so, see
    :mod:`megatron_mimo.failpoints`); every record is also appended to
    <root>/records_rank<R>.jsonl, which survives the crash."""

    run = Run(make_cfg(TWO_RANKS, {"checkpoint.save": args["root"], "checkpoint.load": args["root"],
                                   "checkpoint.ckpt_timeout_s": 10, **args.get("overrides", {})}))
    run.load()
    start = run.state.iteration
    records = []
    log = Path(args["root"]) / f"records_rank{dist.get_rank()}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(args["iterations"]):
        records.append(exact(run.step()))
        with log.open("a") as out:
            out.write(json.dumps(records[-1]) + "\n")
        run.save()
        run.manager.poll()
    run.close()
    return Crashed(start, records)


CORRUPTIONS = {
    "truncated_shard": lambda d: _truncate(next(d.glob("*.distcp"))),
    "missing_shard": lambda d: next(d.glob("*.distcp")).unlink(),
    "garbage_metadata": lambda d: (d / ".metadata").write_bytes(b"not a pickle\n" * 8),
    "garbage_common": lambda d: (d / "common.pt").write_bytes(b"\x00garbage" * 16),
    "garbage_manifest": lambda d: (d / "mimo_manifest.json").write_text("{ not json"),
    "garbage_tracker": lambda d: (d.parent / "latest_checkpointed_iteration.txt").write_text("x1\n"),
    "flipped_bit": lambda d: _flip_bit(max(d.glob("*.distcp"), key=lambda p: p.stat().st_size)),
}
"""Ways a checkpoint on disk gets damaged; each must give one CheckpointError naming the file."""


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def mode_corrupt(args: dict) -> Corrupt:
    """Save one checkpoint, then load a damaged copy of it once per kind of damage."""

    root = Path(args["root"])
    run = Run(make_cfg(TWO_RANKS, {"checkpoint.save": str(root / "good"),
                                   "checkpoint.ckpt_keep_last": 2}))
    for _ in range(3):  # retention keeps iterations 2 and 3
        run.step()
        run.save()
    run.close()
    out = Corrupt(kept=sorted(p.name for p in (root / "good").iterdir()), loads={})
    for name, damage in CORRUPTIONS.items():
        copy = root / name
        if dist.get_rank() == 0:
            shutil.copytree(root / "good", copy)
            damage(copy / f"iter_{3:07d}")
        dist.barrier()
        probe = Run(make_cfg(TWO_RANKS, {"checkpoint.load": str(copy)}))
        try:
            probe.load()
            out.loads[name] = LoadAttempt(None, None)
        except Exception as error:  # noqa: BLE001 - the type and message are what is checked
            out.loads[name] = LoadAttempt(type(error).__name__, str(error))
        probe.close()
    return out


def mode_disk_full(args: dict) -> DiskFull:
    """Save to a small filesystem: the first checkpoint fits, the second does not (once
    synchronously, once in the background); a new manager then clears the leftovers."""
    from megatron_mimo.checkpoint.storage import read_tracker

    root = Path(args["root"]) / "ckpt"
    attempts: dict[str, FullSave] = {}
    leftovers_at_start = []
    for attempt, background in (("sync", False), ("async", True)):
        run = Run(make_cfg(TWO_RANKS, {"checkpoint.save": str(root),
                                       "checkpoint.async_save": background}))
        leftovers_at_start.append(sorted(p.name for p in root.glob(".tmp_*")))
        run.step()
        if attempt == "sync":
            run.save()
        run.step()
        start, failure = time.monotonic(), None
        try:
            run.save()
            run.manager.wait()
        except Exception as error:  # noqa: BLE001 - the type and message are what is checked
            failure = error
        seconds = time.monotonic() - start
        tracker = read_tracker(root)
        dist.barrier()
        attempts[attempt] = FullSave(
            type=type(failure).__name__ if failure else None, error=str(failure) if failure else None,
            seconds=seconds if failure else None, tracker=tracker,
            leftovers=sorted(p.name for p in root.glob(".tmp_*")))
        run.close()
    Run(make_cfg(TWO_RANKS, {"checkpoint.save": str(root)})).close()
    return DiskFull(attempts, leftovers_at_start, sorted(p.name for p in root.glob(".tmp_*")))


MODES = {"features": mode_features, "crash": mode_crash, "corrupt": mode_corrupt,
         "disk_full": mode_disk_full}


def body(args: dict) -> Any:
    forbid_parallel_state_groups()
    return MODES[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
