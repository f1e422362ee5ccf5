"""Where a training step's time goes, per rank and pipeline stage.

    torchrun --standalone --nproc-per-node 4 bench/step_breakdown.py --config tiny_cpu --train-iters 12
    torchrun --standalone --nproc-per-node 4 bench/step_breakdown.py --config tiny_cpu_pp --train-iters 12
    torchrun --standalone --nproc-per-node 3 bench/step_breakdown.py --config tiny_cpu_pp --llm-pp 1

Every step runs megatron-core's 1F1B schedule; the phases of every rank are ``data``,
``forward``, ``backward`` (compute), ``bridge`` (images <-> language stage 0), ``p2p`` (between
language stages, PP > 1 only), ``grad_sync`` and ``optimizer``; both communication phases
include waiting for the peer, i.e. the pipeline bubble; ``backward`` is the rest of the
schedule's time. Each rank reports its pipeline ``stage``. On a GPU the phases are device time
(CUDA events on the current stream), on the CPU host time (see
:mod:`megatron_mimo.training.timing`).

Prints one JSON object (rank 0): mean ms per phase for each rank after 2 warm-up iterations,
and each phase as a fraction of that rank's step time. ``bridge`` includes waiting for the
other branch, so on CPU it is mostly the other branch's compute.
"""

import json
import sys

import torch.distributed as dist

from megatron_mimo.config.cli import config_from_args
from megatron_mimo.training.trainer import started_trainer

WARMUP = 2


def main() -> int:
    cfg, _ = config_from_args(sys.argv[1:])
    with started_trainer(cfg) as trainer:
        phases, totals = [], []
        for _ in range(cfg.training.train_iters):
            totals.append(trainer.step()["ms_per_iteration"])
            phases.append(trainer.last_result.phase_ms)
        kept = range(WARMUP, len(totals))
        names = sorted({name for p in phases for name in p})
        mine = {"rank": dist.get_rank(), "branch": trainer.branch,
                "stage": trainer.job.topology.pgs().pp.rank(),
                "step_ms": sum(totals[i] for i in kept) / len(kept),
                "phase_ms": {n: sum(phases[i].get(n, 0.0) for i in kept) / len(kept) for n in names}}
        mine["phase_fraction"] = {n: round(v / mine["step_ms"], 3) for n, v in mine["phase_ms"].items()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if dist.get_rank() == 0:
            print(json.dumps({"config": cfg.name, "language_pp": cfg.language_parallel.pp,
                              "iterations_measured": len(kept), "ranks": gathered}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
