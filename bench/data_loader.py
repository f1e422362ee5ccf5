"""Does data loading ever stall a step? Loader throughput per rank vs what a step consumes.

    megatron-mimo data prepare-digits data/digits   # once (make train does it too)
    torchrun --standalone --nproc-per-node 4 bench/data_loader.py --config digits_cpu \\
        --data-path data/digits --train-iters 30 --num-workers 0

Per rank, after 3 warm-up iterations:
- ``loader_samples_per_s``: this rank's own views read back to back, nothing else running on
  the rank (a fresh source with the run's settings, 10 global batches);
- ``step_samples_per_s``: samples of this rank's part of a global batch per second of a step;
- ``headroom`` = loader / step consumption (> 1: the loader could keep up even if it ran
  in line with the step; with worker processes it also runs beside it);
- ``data_fraction``: share of the step spent waiting for data (the ``data`` phase).
Prints one JSON object (rank 0).
"""

import json
import sys
import time

import torch.distributed as dist

from megatron_mimo.config.cli import config_from_args
from megatron_mimo.data.source import build_branch_data
from megatron_mimo.training.trainer import started_trainer

WARMUP = 3
LOADER_BATCHES = 10


def loader_rate(cfg, branch: str, dp_rank: int) -> float:
    """Samples per second this rank's views deliver when read back to back."""
    source = build_branch_data(cfg, branch, dp_rank)
    try:
        source.next_global_batch()  # start (and fork workers) outside the timing
        start = time.perf_counter()
        samples = sum(len(micro["keys"]) for _ in range(LOADER_BATCHES)
                      for micro in source.next_global_batch())
        return samples / (time.perf_counter() - start)
    finally:
        source.close()


def main() -> int:
    cfg, _ = config_from_args(sys.argv[1:])
    with started_trainer(cfg) as trainer:
        rate = loader_rate(cfg, trainer.branch, trainer.job.topology.dp_rank())
        dist.barrier()
        steps, data_ms = [], []
        for _ in range(cfg.training.train_iters):
            steps.append(trainer.step()["ms_per_iteration"])
            data_ms.append(trainer.last_result.phase_ms.get("data", 0.0))
        step_ms = sum(steps[WARMUP:]) / len(steps[WARMUP:])
        samples = cfg.branch_micro_batch(trainer.branch) * cfg.num_microbatches
        consumption = samples / (step_ms / 1e3)
        mine = {"rank": dist.get_rank(), "branch": trainer.branch,
                "loader_samples_per_s": round(rate, 1), "step_ms": round(step_ms, 1),
                "step_samples_per_s": round(consumption, 1),
                "headroom": round(rate / consumption, 2),
                "data_fraction": round(sum(data_ms[WARMUP:]) / sum(steps[WARMUP:]), 3)}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if dist.get_rank() == 0:
            print(json.dumps({"config": cfg.name, "num_workers": cfg.data.num_workers,
                              "iterations_measured": len(steps) - WARMUP, "ranks": gathered},
                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
