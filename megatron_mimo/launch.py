"""Process-level driver: distributed init, topology, run, teardown (no training math here)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mimo.config import MimoConfig
from megatron_mimo.job import build_job
from megatron_mimo.log import setup_logging, silence_known_warnings
from megatron_mimo.metrics import MetricSinks
from megatron_mimo.runtime import destroy_distributed, init_distributed
from megatron_mimo.topology import Topology, build_topology
from megatron_mimo.train import TrainState, train

logger = logging.getLogger(__name__)


def check_topology(topology: Topology, device: torch.device) -> None:
    """All-reduce a rank-tagged value in this rank's TP and DP groups and check the sums."""
    pgs = topology.pgs()
    spec = topology.spec(topology.my_branch)
    for label, group in (("tp", pgs.tp), ("dp", pgs.dp)):
        value = torch.tensor([float(topology.rank)], device=device)
        dist.all_reduce(value, group=group)
        expected = float(sum(dist.get_process_group_ranks(group)))
        if value.item() != expected:
            raise RuntimeError(f"{label} all-reduce gave {value.item()}, expected {expected}")
    logger.debug("%s: tp rank %d/%d, dp rank %d/%d; tp and dp all-reduce ok", spec.describe(),
                pgs.tp.rank(), pgs.tp.size(), pgs.dp.rank(), pgs.dp.size())


def run(cfg: MimoConfig) -> int:
    """Run the job described by ``cfg`` on this process (launched by torchrun)."""
    silence_known_warnings()
    runtime = init_distributed()
    rank = dist.get_rank()
    setup_logging(rank, level=cfg.logging.log_level)
    topology = build_topology(cfg.branch_specs())
    setup_logging(rank, topology.my_branch, cfg.logging.log_level)
    try:
        check_topology(topology, runtime.device)
        logger.info("layout: %s", topology.describe())
        job = build_job(cfg, runtime, topology)
        sinks = MetricSinks(active=job.is_reporting_rank(), train_iters=cfg.training.train_iters,
                            jsonl=Path(cfg.logging.metrics_file) if cfg.logging.metrics_file else None,
                            tensorboard_dir=cfg.logging.tensorboard_dir)
        if sinks.active:
            logger.info("config %s: %s", cfg.name, json.dumps(cfg.to_dict(), sort_keys=True))
        try:
            train(job, TrainState(), sinks)
        finally:
            sinks.close()
    finally:
        topology.destroy()
        destroy_distributed()
    return 0
