"""Checkpoint speed at production size vs plain torch.distributed.checkpoint and the disk.

    torchrun --standalone --nproc-per-node 4 bench/ckpt_speed.py --size production \
        --save /tmp/ckpt-bench --load /tmp/ckpt-bench

``--size production`` is the issue-13 model (hidden 1024, 8 layers, vocab 32000; ViT 768 x 6):
a ~3.4 GB checkpoint over 4 ranks; without it the flags/preset decide (tiny_cpu: 4 MB).
In one run: our sync saves and loads vs plain ``dcp.save``/``dcp.load`` of the same local tensors
(main replicas) vs a raw sequential write of the same bytes with fsync (the physical floor);
an async save's stall (time the loop is blocked) vs the sync save; the checksum cost; peak RSS
growth during a load vs a training step; seconds per save phase on every rank. Rank 0 prints JSON.
``--resume-time`` (no torchrun) then launches two short torchrun jobs, fresh and resumed, and
reports process start -> first finished iteration for each.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PRODUCTION = ["--hidden-size", "1024", "--num-layers", "8", "--ffn-hidden-size", "4096",
              "--num-attention-heads", "16", "--vocab-size", "32000", "--seq-length", "64",
              "--encoder-hidden-size", "768", "--encoder-num-layers", "6",
              "--encoder-ffn-hidden-size", "3072", "--encoder-num-attention-heads", "12"]
"""The production-like size of issue 13 (on top of tiny_cpu's layout)."""
REPEATS = 3


def expand(argv: list[str]) -> list[str]:
    """``--size production`` -> the model flags above."""
    if "--size" not in argv:
        return argv
    at = argv.index("--size")
    if argv[at + 1] != "production":
        raise SystemExit(f"--size: only 'production' is known, got {argv[at + 1]!r}")
    return argv[:at] + PRODUCTION + argv[at + 2:]


def peak_rss_growth(fn) -> int:
    """Bytes the peak RSS rose above the RSS at the start of ``fn`` (Linux: clear_refs, VmHWM)."""
    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS")
    fn()
    return status("VmHWM") - start


def timed(fn) -> float:
    """Wall time of ``fn`` on the slowest rank (barriers on both sides)."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def world_max(value: float) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def plain_tensors(trainer) -> dict:
    """This rank's main-replica tensors of a save, cloned (what plain DCP saves)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_mimo.checkpoint.contents import Contents, sharded_state

    sharded = sharded_state(trainer.pieces(), trainer.job.topology,
                            Contents.to_save(trainer.cfg.checkpoint), saving=True)
    rank = dist.get_rank()
    return {f"r{rank}.{i}": v.data.detach().clone() for i, v in enumerate(nested_values(sharded))
            if isinstance(v, ShardedTensor) and v.replica_id in (0, (0, 0, 0))}


def raw_write(tensors: dict, path: Path) -> None:
    """The same bytes, one sequential file per rank, fsync'd: the disk's floor."""
    import torch

    with open(path, "wb") as out:
        for tensor in tensors.values():
            out.write(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy())
        out.flush()
        os.fsync(out.fileno())


def plain_dcp(tensors: dict, root: Path) -> dict:
    """Plain dcp.load into the same tensors (of the last plain save) and the raw write."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from megatron_mimo.checkpoint.manager import directory_bytes

    directory = root / "plain_dcp"
    load = timed(lambda: dcp.load(tensors, checkpoint_id=str(directory)))
    raw_dir = root / "raw"
    raw_dir.mkdir(exist_ok=True)
    raw = timed(lambda: raw_write(tensors, raw_dir / f"rank{dist.get_rank()}.bin"))
    return {"load_s": load, "bytes": directory_bytes(directory), "raw_write_fsync_s": raw,
            "raw_bytes": directory_bytes(raw_dir)}


def async_stall(trainer) -> dict:
    """One async save while training continues: the loop's blocked time and the time until the
    checkpoint is published."""
    import psutil

    from megatron_mimo.checkpoint.background import BackgroundSaves

    manager = trainer.checkpoints
    manager.background = BackgroundSaves()
    before = manager.seconds["blocked"]
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    trainer.save()
    steps = 0
    while manager.background.pending:
        trainer.step()
        manager.poll()
        steps += 1
    published = time.perf_counter() - start
    manager.background = None
    return {"stall_s": world_max(manager.seconds["blocked"] - before),
            "published_after_s": world_max(published), "steps_during_write": steps,
            "rss_growth_after_publish_bytes": world_max(psutil.Process().memory_info().rss - rss)}


def checksum_cost(trainer) -> float:
    """Hashing this rank's shard of the last checkpoint (what the writer adds), slowest rank."""
    import torch.distributed as dist

    from megatron_mimo.checkpoint import integrity
    from megatron_mimo.checkpoint.storage import checkpoint_dir

    directory = checkpoint_dir(trainer.cfg.checkpoint.save, trainer.state.iteration)
    mine = sorted(directory.glob(f"__{dist.get_rank()}_*.distcp"))
    return timed(lambda: integrity.checksums(directory, [p.name for p in mine]))


def phases(trainer, fn) -> list[dict]:
    """Seconds per save phase of ``fn`` on every rank (the manager's own timers)."""
    import torch.distributed as dist

    manager = trainer.checkpoints
    before = dict(manager.seconds)
    fn()
    mine = {k: round(v - before.get(k, 0.0), 3) for k, v in manager.seconds.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def clear(trainer) -> None:
    """Remove the last checkpoint (untimed) so a save is a new directory, as in training."""
    import torch.distributed as dist

    from megatron_mimo.checkpoint.storage import checkpoint_dir

    if dist.get_rank() == 0:
        shutil.rmtree(checkpoint_dir(trainer.cfg.checkpoint.save, trainer.state.iteration),
                      ignore_errors=True)
    dist.barrier()


def sync_saves(trainer, tensors: dict, root: Path) -> tuple[list[float], list[dict], list[float]]:
    """Ours and plain dcp.save alternately (so both meet the same page-cache and disk state),
    each into a new directory."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    ours, split, plain = [], [], []
    directory = root / "plain_dcp"
    for _ in range(REPEATS):
        clear(trainer)
        split.append(phases(trainer, lambda: ours.append(timed(trainer.save))))
        if dist.get_rank() == 0 and directory.exists():
            shutil.rmtree(directory)
        dist.barrier()
        plain.append(timed(lambda: dcp.save(tensors, checkpoint_id=str(directory))))
    return ours, split, plain


def measure(argv: list[str]) -> int:
    from megatron_mimo.metrics.log import quiet_third_party

    quiet_third_party()
    import torch.distributed as dist

    from megatron_mimo.config.cli import config_from_args
    from megatron_mimo.training.step import train_step
    from megatron_mimo.training.trainer import started_trainer

    cfg, _ = config_from_args(argv)
    root = Path(cfg.checkpoint.save)
    with started_trainer(cfg) as trainer:
        trainer.step()
        tensors = plain_tensors(trainer)
        ours, split, plain_saves = sync_saves(trainer, tensors, root)
        from megatron_mimo.checkpoint.manager import directory_bytes

        ours_bytes = directory_bytes(root / f"iter_{trainer.state.iteration:07d}")
        checksum = checksum_cost(trainer)
        load = timed(trainer.load)
        load_peak = peak_rss_growth(trainer.load)  # resume memory spike: state materialised twice?
        step_peak = peak_rss_growth(lambda: train_step(trainer.job))
        stall: dict = {}
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, {"rank": dist.get_rank(), "load_peak_growth_bytes": load_peak,
                                       "train_step_peak_growth_bytes": step_peak})
        clear(trainer)
        async_split = phases(trainer, lambda: stall.update(async_stall(trainer)))
        plain = {**plain_dcp(tensors, root), "save_s": plain_saves}
        if dist.get_rank() == 0:
            print(json.dumps(report(cfg.name, ours, ours_bytes, load, checksum, stall, plain,
                                    peaks, {"sync_last": split[-1], "async": async_split}),
                             indent=1))
    return 0


def report(name, ours, ours_bytes, load, checksum, stall, plain, peaks, split) -> dict:
    later = sum(ours[1:]) / (REPEATS - 1)
    plain_later = sum(plain["save_s"][1:]) / (REPEATS - 1)
    load_ratio = max(p["load_peak_growth_bytes"] / max(p["train_step_peak_growth_bytes"], 1)
                     for p in peaks)
    return {
        "config": name, "argv": sys.argv[1:], "bytes": ours_bytes, "plain_dcp_bytes": plain["bytes"],
        "save_s": ours, "plain_dcp_save_s": plain["save_s"], "load_s": load,
        "plain_dcp_load_s": plain["load_s"], "raw_write_fsync_s": plain["raw_write_fsync_s"],
        "save_vs_plain_dcp_time_ratio": plain_later / later,
        "save_vs_plain_dcp_throughput_ratio": (ours_bytes / later) / (plain["bytes"] / plain_later),
        "save_vs_raw_write_throughput_ratio":
            (ours_bytes / later) / (plain["raw_bytes"] / plain["raw_write_fsync_s"]),
        "load_vs_plain_dcp_time_ratio": plain["load_s"] / load,
        "async": stall, "async_stall_vs_sync_save": stall["stall_s"] / later,
        "checksum_s": checksum, "checksum_vs_save": checksum / later,
        "peak_rss_growth": peaks, "load_vs_step_peak_rss_growth_max": load_ratio,
        "seconds_per_phase_per_rank": split,
    }


def first_iteration(argv: list[str]) -> int:
    """One torchrun job: load (if --load), one iteration; print seconds from process start."""
    import psutil

    from megatron_mimo.config.cli import config_from_args
    from megatron_mimo.training.trainer import started_trainer

    cfg, _ = config_from_args(argv)
    with started_trainer(cfg) as trainer:
        trainer.load()
        trainer.step()
        seconds = world_max(time.time() - psutil.Process().create_time())
        if int(os.environ["RANK"]) == 0:
            print(json.dumps({"seconds_to_first_iteration": seconds}))
    return 0


def resume_time(argv: list[str]) -> int:
    """Fresh start vs resume from --load, each as its own torchrun job (no torchrun here)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    fresh = list(argv)
    if "--load" in fresh:
        at = fresh.index("--load")
        del fresh[at:at + 2]
    figures = {}
    for name, args in (("fresh", fresh), ("resume", argv)):
        done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "4", __file__,
                               "--first-iteration", *args], capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if "seconds_to_first_iteration" in x]
        figures[name] = (json.loads(line[-1])["seconds_to_first_iteration"] if line
                         else done.stderr[-500:])
    if all(isinstance(v, float) for v in figures.values()):
        figures["resume_vs_fresh"] = figures["resume"] / figures["fresh"]
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    arguments = expand(sys.argv[1:])
    if arguments[:1] == ["--resume-time"]:
        sys.exit(resume_time(arguments[1:]))
    if arguments[:1] == ["--first-iteration"]:
        sys.exit(first_iteration(arguments[1:]))
    sys.exit(measure(arguments))
