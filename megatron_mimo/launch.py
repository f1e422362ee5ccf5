"""Process-level driver: distributed init, topology, job, run, teardown (no training math here)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mimo.checkpoint import CheckpointManager
from megatron_mimo.config import MimoConfig
from megatron_mimo.job import Job, build_job, destroy_job
from megatron_mimo.log import setup_logging, silence_known_warnings
from megatron_mimo.metrics import MetricSinks
from megatron_mimo.runtime import destroy_distributed, init_distributed
from megatron_mimo.stopping import EXIT_STOPPED_EARLY, StopWatch
from megatron_mimo.topology import Topology, build_topology
from megatron_mimo.train import TrainState, train

logger = logging.getLogger(__name__)


def check_topology(topology: Topology, device: torch.device) -> None:
    """All-reduce a rank-tagged value in this rank's TP and DP groups and check the sums."""
    pgs = topology.pgs()
    for label, group in (("tp", pgs.tp), ("dp", pgs.dp)):
        value = torch.tensor([float(topology.rank)], device=device)
        dist.all_reduce(value, group=group)
        expected = float(sum(dist.get_process_group_ranks(group)))
        if value.item() != expected:
            raise RuntimeError(f"{label} all-reduce gave {value.item()}, expected {expected}")


@contextmanager
def started_job(cfg: MimoConfig) -> Iterator[Job]:
    """Init the world, build topology and job for this rank; tear everything down after."""
    silence_known_warnings()
    runtime = init_distributed()
    setup_logging(dist.get_rank(), level=cfg.logging.log_level)
    try:
        topology = build_topology(cfg.branch_specs())
        setup_logging(dist.get_rank(), topology.my_branch, cfg.logging.log_level)
        check_topology(topology, runtime.device)
        job = build_job(cfg, runtime, topology)
        try:
            yield job
        finally:
            destroy_job(job)
    finally:
        destroy_distributed()


def metric_sinks(job: Job) -> MetricSinks:
    """Sinks of this rank: real ones on the reporting rank only."""
    cfg = job.cfg
    return MetricSinks(active=job.is_reporting_rank(), train_iters=cfg.training.train_iters,
                       jsonl=Path(cfg.logging.metrics_file) if cfg.logging.metrics_file else None,
                       tensorboard_dir=cfg.logging.tensorboard_dir)


def run(cfg: MimoConfig) -> int:
    """Run the job described by ``cfg`` on this process (launched by torchrun)."""
    with started_job(cfg) as job:
        sinks = metric_sinks(job)
        if sinks.active:
            logger.info("layout: %s", job.topology.describe())
            logger.info("config %s: %s", cfg.name, json.dumps(cfg.to_dict(), sort_keys=True))
        checkpoints = CheckpointManager(job) if (cfg.checkpoint.save or cfg.checkpoint.load) else None
        budget = cfg.training.exit_duration_in_mins
        stop = StopWatch(exit_duration_s=budget * 60 if budget else None).install()
        try:
            state = (checkpoints.load() if checkpoints else None) or TrainState()
            if state.iteration:
                logger.info("resuming at iteration %d (%d samples consumed)", state.iteration,
                            state.consumed_samples)
            train(job, state, sinks, checkpoints, stop)
        finally:
            stop.uninstall()
            sinks.close()
            if checkpoints is not None:
                checkpoints.close()
    if state.stopped_early:
        logger.warning("stopped early at iteration %d; exit code %d means 'resume me'",
                       state.iteration, EXIT_STOPPED_EARLY)
        return EXIT_STOPPED_EARLY
    return 0
