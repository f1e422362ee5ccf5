"""Where a training step's time goes, per branch: encoder, bridge, language, grad sync, optimizer.

    torchrun --standalone --nproc-per-node 4 bench/step_breakdown.py --config tiny_cpu --train-iters 12

Prints one JSON object (rank 0): mean ms per phase for each rank after 2 warm-up iterations,
and each phase as a fraction of that rank's step time. ``bridge`` includes waiting for the
other branch, so on CPU it is mostly the other branch's compute.
"""

import json
import sys
import time

import torch.distributed as dist

from megatron_mimo.cli import config_from_args
from megatron_mimo.launch import started_job
from megatron_mimo.train import TrainState, advance, train_step

WARMUP = 2


def main() -> int:
    cfg, _ = config_from_args(sys.argv[1:])
    with started_job(cfg) as job:
        state, phases, totals = TrainState(), [], []
        for _ in range(cfg.training.train_iters):
            start = time.perf_counter()
            result = train_step(job, state)
            totals.append((time.perf_counter() - start) * 1e3)
            phases.append(result.phase_ms)
            advance(state, result, cfg.training.global_batch_size, job.num_parameters)
        kept = range(WARMUP, len(totals))
        names = sorted({name for p in phases for name in p})
        mine = {"rank": dist.get_rank(), "branch": job.branch,
                "step_ms": sum(totals[i] for i in kept) / len(kept),
                "phase_ms": {n: sum(phases[i].get(n, 0.0) for i in kept) / len(kept) for n in names}}
        mine["phase_fraction"] = {n: round(v / mine["step_ms"], 3) for n, v in mine["phase_ms"].items()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if dist.get_rank() == 0:
            print(json.dumps({"config": cfg.name, "iterations_measured": len(kept), "ranks": gathered},
                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
