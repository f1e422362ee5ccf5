"""Step time, checkpoint size and peak memory per rank in fp32, bf16 and fp16, in one run.

    torchrun --standalone --nproc-per-node 4 bench/precision.py --config tiny_cpu \
        --train-iters 12 --save /tmp/precision-bench

Trains the same job three times in the same processes (one Trainer per precision), saves one
checkpoint each, and prints JSON (rank 0): mean ms per iteration after 2 warm-up iterations
(slowest rank), checkpoint bytes, and per rank how far the peak RSS rose while training;
ratios are against fp32.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from ckpt_speed import peak_rss_growth  # bench/ is the script directory

from megatron_mimo.checkpoint.storage import directory_bytes
from megatron_mimo.config.cli import apply_overrides, config_from_args
from megatron_mimo.distributed.runtime import destroy_distributed, init_distributed
from megatron_mimo.metrics.log import quiet_third_party, setup_logging
from megatron_mimo.training.trainer import Trainer

WARMUP = 2
PRECISIONS = {"fp32": {}, "bf16": {"precision.bf16": True},
              "fp16": {"precision.fp16": True, "precision.initial_loss_scale": 256.0}}


def measure(cfg) -> dict:
    """Train ``cfg`` on this rank; return step ms, peak RSS growth and the checkpoint size."""
    with Trainer(cfg) as trainer:
        times: list[float] = []
        peak = peak_rss_growth(lambda: times.extend(
            trainer.step()["ms_per_iteration"] for _ in range(cfg.training.train_iters)))
        directory = trainer.save()
    dist.barrier()
    kept = times[WARMUP:]
    return {"step_ms": sum(kept) / len(kept), "peak_rss_growth_bytes": peak,
            "checkpoint_bytes": directory_bytes(directory) if dist.get_rank() == 0 else None}


def main() -> int:
    cfg, _ = config_from_args(sys.argv[1:])
    quiet_third_party()
    setup_logging(int(os.environ["RANK"]), level="WARNING")
    init_distributed()
    root = Path(cfg.checkpoint.save or "/tmp/precision-bench")
    results = {}
    try:
        for name, flags in PRECISIONS.items():
            run_cfg = apply_overrides(cfg, {**flags, "checkpoint.save": str(root / name)})
            began = time.perf_counter()
            mine = measure(run_cfg)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            results[name] = {
                "step_ms_slowest_rank": max(g["step_ms"] for g in gathered),
                "checkpoint_bytes": gathered[0]["checkpoint_bytes"],
                "peak_rss_growth_bytes_per_rank": [g["peak_rss_growth_bytes"] for g in gathered],
                "wall_s": time.perf_counter() - began}
    finally:
        destroy_distributed()
    if int(os.environ["RANK"]) == 0:
        base = results["fp32"]
        for name in ("bf16", "fp16"):
            results[name]["step_time_vs_fp32"] = results[name]["step_ms_slowest_rank"] / base["step_ms_slowest_rank"]
            results[name]["checkpoint_size_vs_fp32"] = results[name]["checkpoint_bytes"] / base["checkpoint_bytes"]
        print(json.dumps({"config": cfg.name, "iterations": cfg.training.train_iters, **results},
                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
