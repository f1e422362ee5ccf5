"""Save/load time and size of a checkpoint vs a plain torch.distributed.checkpoint.save.

    torchrun --standalone --nproc-per-node 4 bench/ckpt_speed.py --config tiny_cpu \
        --save /tmp/ckpt-bench --load /tmp/ckpt-bench

Trains one iteration, then saves 3 times and loads twice through the Trainer's CheckpointManager,
and saves the same local tensors (model + optimizer state, main replicas) 3 times with plain
``torch.distributed.checkpoint.save``. Prints JSON (rank 0) with per-save times and ratios, and
per rank how far the peak RSS rose during a load vs during a training step (resume memory spike).
"""

import json
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_mimo.checkpoint.contents import Contents, sharded_state
from megatron_mimo.checkpoint.manager import directory_bytes
from megatron_mimo.config.cli import config_from_args
from megatron_mimo.training.step import train_step
from megatron_mimo.training.trainer import started_trainer

REPEATS = 3


def peak_rss_growth(fn) -> int:
    """Bytes the process's peak RSS rose above its RSS at the start of ``fn`` (Linux only):
    resets the high-water mark through /proc/self/clear_refs, runs ``fn``, reads VmHWM."""
    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS")
    fn()
    return status("VmHWM") - start


def plain_tensors(trainer) -> dict:
    sharded = sharded_state(trainer.pieces(), trainer.job.topology,
                            Contents.to_save(trainer.cfg.checkpoint), saving=True)
    rank = dist.get_rank()
    return {f"r{rank}.{i}": v.data.detach().clone() for i, v in enumerate(nested_values(sharded))
            if isinstance(v, ShardedTensor) and v.replica_id in (0, (0, 0, 0))}


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> int:
    cfg, _ = config_from_args(sys.argv[1:])
    root = Path(cfg.checkpoint.save)
    with started_trainer(cfg) as trainer:
        trainer.step()
        ours = [timed(trainer.save) for _ in range(REPEATS)]
        ours_bytes = directory_bytes(root / f"iter_{trainer.state.iteration:07d}")
        load = timed(trainer.load)
        load_peak = peak_rss_growth(trainer.load)  # resume memory spike: state materialised twice?
        step_peak = peak_rss_growth(
            lambda: train_step(trainer.job))
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, {"rank": dist.get_rank(), "load_peak_growth_bytes": load_peak,
                                       "train_step_peak_growth_bytes": step_peak})
        tensors = plain_tensors(trainer)
        plain_dir = root / "plain_dcp"
        plain = []
        for _ in range(REPEATS):
            if dist.get_rank() == 0 and plain_dir.exists():
                shutil.rmtree(plain_dir)
            dist.barrier()
            plain.append(timed(lambda: dcp.save(tensors, checkpoint_id=str(plain_dir))))
        plain_bytes = directory_bytes(plain_dir)
        if dist.get_rank() == 0:
            print(json.dumps({
                "config": cfg.name, "save_s": ours, "load_s": load, "bytes": ours_bytes,
                "plain_dcp_save_s": plain, "plain_dcp_bytes": plain_bytes,
                "ratio_first_save_vs_plain_first": ours[0] / plain[0],
                "ratio_later_saves_vs_plain_later": (sum(ours[1:]) / (REPEATS - 1)) / (sum(plain[1:]) / (REPEATS - 1)),
                "local_tensors_rank0": sum(t.numel() for t in tensors.values()),
                "peak_rss_growth": peaks,
            }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
