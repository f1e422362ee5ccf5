"""Checkpoint worlds that break things: structure, mismatches, crashes, damaged files, full disks.

Modes (args["mode"]):
  "features"  uneven DP3 optimizer shards, constant structure with optional state, mismatches
  "crash"     train with a save every iteration while a rank dies inside one save
  "corrupt"   load damaged copies of one checkpoint (truncated shard, garbage metadata, ...)
  "disk_full" save to a small filesystem until it is full
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tests.workers.ckpt_world import TWO_RANKS, UNEVEN, Run, exact, make_cfg
from tests.workers.common import forbid_parallel_state_groups, worker_main


def mode_features(args: dict) -> dict:
    root, out = args["root"], {}
    run = Run(make_cfg(UNEVEN, {"checkpoint.save": root, "checkpoint.ckpt_timeout_s": 5}))
    shard = sum(p.numel() for opt_group in run.job.optimizer.param_groups for p in opt_group["params"])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (run.job.branch, shard))
    out["shards"] = gathered
    run.step()
    run.save()
    first = run.manager.last_fingerprint
    run.step(inject_found_inf=True)  # optional state (skip history) becomes non-empty
    run.save()
    out["fingerprints"] = [first, run.manager.last_fingerprint]
    out["eval_at_save"] = run.eval_loss()
    run.close()
    reload = Run(make_cfg(UNEVEN, {"checkpoint.load": root, "checkpoint.save": root + "_again",
                                   "checkpoint.ckpt_timeout_s": 5}))
    reload.load()
    out["reloaded"] = {"iteration": reload.state.iteration, "skipped_at": reload.state.skipped_at,
                       "eval": reload.eval_loss()}
    out["mismatch"] = _save_error(reload, bump_iteration_on_rank=dist.get_world_size() - 1)
    out["missing"] = _save_error(reload, skip_on_rank=dist.get_world_size() - 1)
    return out


def _save_error(run: Run, bump_iteration_on_rank: int | None = None,
                skip_on_rank: int | None = None) -> dict:
    rank = dist.get_rank()
    if rank == skip_on_rank:
        time.sleep(run.cfg.checkpoint.ckpt_timeout_s + 5)  # busy elsewhere, never saves
        return {"skipped": True}
    iteration = run.state.iteration + (rank == bump_iteration_on_rank)
    start = time.monotonic()
    try:
        run.manager.save(iteration)
        return {"error": None}
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - start}


def mode_crash(args: dict) -> dict:
    """Save every iteration (one rank dies inside a save when the fault hook says so); every
    record is also appended to <root>/records_rank<R>.jsonl, which survives the crash."""

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
    return {"start": start, "records": records}


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


def mode_corrupt(args: dict) -> dict:
    """Save one checkpoint, then load a damaged copy of it once per kind of damage."""

    root = Path(args["root"])
    run = Run(make_cfg(TWO_RANKS, {"checkpoint.save": str(root / "good"),
                                   "checkpoint.ckpt_keep_last": 2}))
    for _ in range(3):  # retention keeps iterations 2 and 3
        run.step()
        run.save()
    run.close()
    out = {"kept": sorted(p.name for p in (root / "good").iterdir())}
    for name, damage in CORRUPTIONS.items():
        copy = root / name
        if dist.get_rank() == 0:
            shutil.copytree(root / "good", copy)
            damage(copy / f"iter_{3:07d}")
        dist.barrier()
        probe = Run(make_cfg(TWO_RANKS, {"checkpoint.load": str(copy)}))
        try:
            probe.load()
            out[name] = {"error": None}
        except Exception as error:  # noqa: BLE001 - the type and message are what is checked
            out[name] = {"type": type(error).__name__, "error": str(error)}
        probe.close()
    return out


def mode_disk_full(args: dict) -> dict:
    """Save to a small filesystem: the first checkpoint fits, the second does not (once
    synchronously, once in the background); a new manager then clears the leftovers."""
    from megatron_mimo.checkpoint.storage import read_tracker

    root = Path(args["root"]) / "ckpt"
    out: dict[str, Any] = {}
    for attempt, background in (("sync", False), ("async", True)):
        run = Run(make_cfg(TWO_RANKS, {"checkpoint.save": str(root),
                                       "checkpoint.async_save": background}))
        out.setdefault("leftovers_at_start", []).append(sorted(p.name for p in root.glob(".tmp_*")))
        run.step()
        if attempt == "sync":
            run.save()
        run.step()
        start = time.monotonic()
        try:
            run.save()
            run.manager.wait()
            out[attempt] = {"error": None}
        except Exception as error:  # noqa: BLE001 - the type and message are what is checked
            out[attempt] = {"type": type(error).__name__, "error": str(error),
                            "seconds": time.monotonic() - start}
        out[attempt]["tracker"] = read_tracker(root)
        dist.barrier()
        out[attempt]["leftovers"] = sorted(p.name for p in root.glob(".tmp_*"))
        run.close()
    Run(make_cfg(TWO_RANKS, {"checkpoint.save": str(root)})).close()
    out["leftovers_at_last_start"] = sorted(p.name for p in root.glob(".tmp_*"))
    return out


MODES = {"features": mode_features, "crash": mode_crash, "corrupt": mode_corrupt,
         "disk_full": mode_disk_full}


def body(args: dict) -> Any:
    forbid_parallel_state_groups()
    return MODES[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
