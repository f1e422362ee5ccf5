"""Checkpoint speed at production size vs plain torch.distributed.checkpoint and the disk.

    torchrun --standalone --nproc-per-node 4 bench/ckpt_speed.py --size production \
        --save /tmp/ckpt-bench --load /tmp/ckpt-bench

``--size production`` is the issue-13 model (hidden 1024, 8 layers, vocab 32000; ViT 768 x 6):
a ~3.4 GB checkpoint over 4 ranks; without it the flags/preset decide (tiny_cpu: 4 MB).
One warm-up round, then ``--rounds N`` (default 5) measured rounds; each round, in an order that
alternates between rounds: our sync save and load (checksums on, verified at load) and plain
``dcp.save``/``dcp.load`` of the same local tensors (main replicas); what the checksums added to
our save (the writers' hashing that outlasted the flush; ``hash_files_s``: the hash alone), and
one async save while training goes on (time the loop is blocked). Rank 0 prints a table of every
ratio per round with its median and spread, then JSON (per-round figures, medians, seconds per
phase on every rank, peak RSS growth of a load vs a training step, and a raw sequential write
of the same bytes with fsync: the disk's floor).
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

from rounds import machine, print_table, summarize

PRODUCTION = ["--hidden-size", "1024", "--num-layers", "8", "--ffn-hidden-size", "4096",
              "--num-attention-heads", "16", "--vocab-size", "32000", "--seq-length", "64",
              "--encoder-hidden-size", "768", "--encoder-num-layers", "6",
              "--encoder-ffn-hidden-size", "3072", "--encoder-num-attention-heads", "12"]
"""The production-like size of issue 13 (on top of tiny_cpu's layout)."""
ROUNDS = 5
"""Measured rounds after one warm-up round (``--rounds N``)."""
TABLE = ("_s", "throughput", "_time", "_save")
"""Figures shown in the printed table (times and ratios; the JSON has every figure)."""


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


def raw_floor(tensors: dict, root: Path) -> dict:
    """The raw sequential write of the same bytes, fsync'd (once, after the rounds)."""
    import torch.distributed as dist

    from megatron_mimo.checkpoint.storage import directory_bytes

    raw_dir = root / "raw"
    raw_dir.mkdir(exist_ok=True)
    seconds = timed(lambda: raw_write(tensors, raw_dir / f"rank{dist.get_rank()}.bin"))
    return {"raw_write_fsync_s": seconds, "raw_bytes": directory_bytes(raw_dir)}


def async_stall(trainer, background) -> dict:
    """One async save while training continues: the loop's blocked time, how much slower the
    steps run while the shards are written (what a snapshot costs outside the save call, e.g.
    copy-on-write faults after a fork), and the time until the checkpoint is published.
    ``background`` is kept across rounds, as a training run keeps it across saves."""
    import psutil

    manager = trainer.checkpoints
    manager.background = background
    plain_step_s = world_max(timed(trainer.step))
    before = manager.seconds["blocked"]
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    trainer.save()
    steps = []
    while manager.background.pending:
        steps.append(timed(trainer.step))
        manager.poll()
    published = time.perf_counter() - start
    manager.background = None
    slower = world_max(sum(steps) / len(steps) - plain_step_s) if steps else 0.0
    return {"stall_s": world_max(manager.seconds["blocked"] - before),
            "step_s": plain_step_s, "step_slowdown_during_write_s": slower,
            "published_after_s": world_max(published), "steps_during_write": len(steps),
            "rss_growth_after_publish_bytes": world_max(psutil.Process().memory_info().rss - rss)}


def checksum_cost(trainer) -> float:
    """Hashing this rank's shard of the last checkpoint alone, slowest rank (for scale: the
    writer hashes while the disk flushes, and only what outlasts the flush adds to a save, its
    'writer.hash_exposed' phase, the ``checksum_s`` figure)."""
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
    """Remove every checkpoint of --save (untimed) so a save is a new directory, as in training,
    and the rounds do not fill the disk."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        for old in Path(trainer.cfg.checkpoint.save).glob("iter_*"):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def one_round(trainer, tensors: dict, root: Path, index: int, background) -> tuple[dict, dict]:
    """Our save and load and plain DCP's, in an order that alternates between rounds (neither
    always meets the warmer page cache), the checksum cost, then one async save while training
    goes on. Returns the figures and the seconds per phase per rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from megatron_mimo.checkpoint.storage import checkpoint_dir, directory_bytes

    got: dict = {}
    split: dict = {}
    plain = root / "plain_dcp"

    def ours_save():
        clear(trainer)
        split["sync"] = phases(trainer, lambda: got.update(save_s=timed(trainer.save)))
        got["bytes"] = directory_bytes(checkpoint_dir(root, trainer.state.iteration))

    def plain_save():
        if dist.get_rank() == 0 and plain.exists():
            shutil.rmtree(plain)
        dist.barrier()
        got["plain_dcp_save_s"] = timed(lambda: dcp.save(tensors, checkpoint_id=str(plain)))
        got["plain_dcp_bytes"] = directory_bytes(plain)

    def ours_load():
        split["load"] = phases(trainer, lambda: got.update(load_s=timed(trainer.load)))

    def plain_load():
        got["plain_dcp_load_s"] = timed(lambda: dcp.load(tensors, checkpoint_id=str(plain)))

    order = ((ours_save, plain_save, ours_load, plain_load) if index % 2 == 0
             else (plain_save, ours_save, plain_load, ours_load))
    for step in order:
        step()
    got["checksum_s"] = max(rank.get("writer.hash_exposed", 0.0) for rank in split["sync"])
    got["hash_files_s"] = checksum_cost(trainer)
    clear(trainer)
    stall: dict = {}
    split["async"] = phases(trainer, lambda: stall.update(async_stall(trainer, background)))
    got.update(stall)
    return {**got, **ratios(got)}, split


def ratios(got: dict) -> dict:
    """The targets' figures (higher is better for the first two, lower for the rest). The loop
    cost of an async save adds to its stall what the steps lost while the shards were written."""
    return {
        "save_vs_plain_dcp_throughput": (got["bytes"] / got["save_s"])
        / (got["plain_dcp_bytes"] / got["plain_dcp_save_s"]),
        "load_vs_plain_dcp_time": got["plain_dcp_load_s"] / got["load_s"],
        "async_stall_vs_sync_save": got["stall_s"] / got["save_s"],
        "async_loop_cost_vs_sync_save": (got["stall_s"] + got["step_slowdown_during_write_s"]
                                         * got["steps_during_write"]) / got["save_s"],
        "checksum_vs_save": got["checksum_s"] / got["save_s"],
    }


def memory_peaks(trainer) -> list[dict]:
    """Peak RSS growth of a load vs a training step, per rank (resume memory spike: is the
    state materialised twice?)."""
    import torch.distributed as dist

    from megatron_mimo.training.step import train_step

    load_peak = peak_rss_growth(trainer.load)
    step_peak = peak_rss_growth(lambda: train_step(trainer.job))
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, {"rank": dist.get_rank(), "load_peak_growth_bytes": load_peak,
                                   "train_step_peak_growth_bytes": step_peak})
    return peaks


def measure(argv: list[str]) -> int:
    from megatron_mimo.metrics.log import quiet_third_party

    quiet_third_party()
    import torch.distributed as dist

    from megatron_mimo.checkpoint.background import BackgroundSaves
    from megatron_mimo.config.cli import config_from_args
    from megatron_mimo.training.trainer import started_trainer

    rounds = ROUNDS
    if "--rounds" in argv:
        at = argv.index("--rounds")
        rounds, argv = int(argv[at + 1]), argv[:at] + argv[at + 2:]
    cfg, _ = config_from_args(argv)
    root = Path(cfg.checkpoint.save)
    with started_trainer(cfg) as trainer:
        trainer.step()
        tensors = plain_tensors(trainer)
        background = BackgroundSaves(trainer.checkpoints.group)
        measured, splits = [], []
        for index in range(rounds + 1):
            figures, split = one_round(trainer, tensors, root, index, background)
            if dist.get_rank() == 0:
                print(f"round {index}{' (warm-up)' if index == 0 else ''}: "
                      f"{json.dumps({k: round(v, 3) for k, v in figures.items()})}", flush=True)
            if index:
                measured.append(figures)
                splits.append(split)
        peaks = memory_peaks(trainer)
        floor = raw_floor(tensors, root)
        if dist.get_rank() == 0:
            summary = summarize(measured)
            print_table(measured, {k: v for k, v in summary.items() if k.endswith(TABLE)})
            load_ratio = max(p["load_peak_growth_bytes"] / max(p["train_step_peak_growth_bytes"], 1)
                             for p in peaks)
            print(json.dumps({
                "config": cfg.name, "argv": sys.argv[1:], "machine": machine(), "rounds": measured,
                "summary": summary, **floor, "peak_rss_growth": peaks,
                "load_vs_step_peak_rss_growth_max": load_ratio,
                "seconds_per_phase_per_rank_last_round": splits[-1]}, indent=1))
    return 0


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
