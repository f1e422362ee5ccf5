"""The Trainer: build one rank's job once, then ``load()``, ``step()``, ``evaluate()``, ``save()``,
``run()``. The CLI, the test workers and the benchmarks all drive this one API.

:func:`run` is the whole process for the CLI: distributed init, logging, a Trainer, stop
requests, teardown, exit code.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megatron_mimo.checkpoint.contents import Pieces
from megatron_mimo.checkpoint.manager import CheckpointManager
from megatron_mimo.config.layout import branch_of
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.distributed.runtime import (
    Runtime,
    destroy_distributed,
    init_distributed,
    select_runtime,
)
from megatron_mimo.distributed.topology import build_topology, check_groups
from megatron_mimo.errors import CheckpointError
from megatron_mimo.metrics.log import setup_logging
from megatron_mimo.metrics.sinks import MetricSinks
from megatron_mimo.training.job import Job, build_job, destroy_job
from megatron_mimo.training.state import (
    EvalResult,
    SkipHistory,
    StepResult,
    TrainState,
    iteration_record,
)
from megatron_mimo.training.step import evaluate, train_step
from megatron_mimo.training.stopping import EXIT_STOPPED_EARLY, StopRequests

logger = logging.getLogger(__name__)


class Trainer:
    """One rank's training run. Create it on every rank of an initialised world, together."""

    def __init__(self, cfg: MimoConfig, runtime: Runtime | None = None) -> None:
        self.cfg = cfg
        runtime = runtime or select_runtime()
        topology = build_topology(cfg.branch_specs())
        check_groups(topology, runtime.device)
        self.job: Job = build_job(cfg, runtime, topology)
        self.state = TrainState()
        self.last_result: StepResult | None = None
        self.last_saved = 0
        log = cfg.logging
        self.sinks = MetricSinks(active=self.job.is_reporting_rank(),
                                 train_iters=cfg.training.train_iters,
                                 jsonl=Path(log.metrics_file) if log.metrics_file else None,
                                 tensorboard_dir=log.tensorboard_dir)
        ckpt = cfg.checkpoint
        self.checkpoints = (CheckpointManager(self.pieces(), topology, ckpt, cfg.to_dict(),
                                              cfg.precision.name)
                            if ckpt.save or ckpt.load else None)

    @property
    def branch(self) -> str:
        """This rank's branch."""
        return self.job.branch

    def pieces(self) -> Pieces:
        """The stateful pieces a checkpoint of this run holds."""
        return Pieces(model=self.job.model, optimizer=self.job.optimizer,
                      schedulers=self.job.schedulers.schedulers, data=self.job.data,
                      events=SkipHistory(self.state), train_state=self.state)

    def load(self) -> bool:
        """Load --load's checkpoint (if any) into this run; True when one was loaded."""
        if self.checkpoints is None or self.checkpoints.load() is None:
            return False
        if self.job.data.consumed_samples != self.state.consumed_samples:
            raise CheckpointError(
                f"{self.branch} data position {self.job.data.consumed_samples} disagrees with the "
                f"train state ({self.state.consumed_samples} consumed samples)")
        self.last_saved = self.state.iteration
        return True

    def step(self) -> dict[str, Any]:
        """Train one iteration; return its metrics record (identical on every rank)."""
        start = time.perf_counter()
        batch = self.cfg.training.global_batch_size
        result = train_step(self.job, self.checkpoints.hold if self.checkpoints else lambda: None)
        self.state.advance(result, batch, self.job.num_parameters)
        self.last_result = result
        return iteration_record(self.state, result, self.job.schedulers.lrs(),
                                time.perf_counter() - start)

    def evaluate(self) -> EvalResult:
        """Loss and answer accuracy on the held-out batches (no parameter, RNG-stream or
        data-position change)."""
        return evaluate(self.job)

    def save(self) -> Path:
        """Save a checkpoint of the current iteration (needs --save)."""
        if self.checkpoints is None:
            raise CheckpointError("save() needs --save")
        self.last_saved = self.state.iteration
        return self.checkpoints.save(self.state.iteration)

    def run(self, stop: StopRequests | None = None) -> list[dict[str, Any]]:
        """Train to --train-iters (or --exit-interval, or an agreed stop); return the records.

        With --save, saves every --save-interval iterations and always at the last one run.
        """
        training, ckpt = self.cfg.training, self.cfg.checkpoint
        saving = bool(ckpt.save)
        records = []
        while self.state.iteration < training.train_iters:
            record = self.step()
            records.append(record)
            iteration = self.state.iteration
            self.sinks.record(record, print_line=iteration % self.cfg.logging.log_interval == 0
                              or iteration == 1)
            if training.eval_interval and iteration % training.eval_interval == 0:
                result = self.evaluate()
                self.sinks.record_eval(iteration, result)
            if saving and ckpt.save_interval and iteration % ckpt.save_interval == 0:
                self.save()
            if self.checkpoints is not None:
                self.checkpoints.poll()  # publishes a finished async save
            if training.exit_interval and iteration % training.exit_interval == 0:
                logger.info("exiting at iteration %d (--exit-interval %d)", iteration,
                            training.exit_interval)
                break
            if stop is not None and stop.agreed(self.job.runtime.device):
                self.state.stopped_early = True
                logger.warning("stopping at iteration %d: %s", iteration,
                               stop.local_reason() or "another rank asked to stop")
                break
        if saving and self.last_saved != self.state.iteration:
            self.save()
        if self.checkpoints is not None:
            self.checkpoints.wait()  # exit only with the last checkpoint published
        return records

    def close(self, failed: bool = False) -> None:
        """Finish a pending checkpoint save (kill its writers instead when the run ``failed``:
        the other ranks may never join), release sinks and process groups (every rank)."""
        self.sinks.close()
        if self.checkpoints is not None:
            self.checkpoints.close(abort=failed)
        destroy_job(self.job)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)


@contextmanager
def started_trainer(cfg: MimoConfig) -> Iterator[Trainer]:
    """This torchrun rank's world, logging and Trainer; everything torn down afterwards."""
    rank = int(os.environ["RANK"])
    setup_logging(rank, branch_of(cfg.branch_specs(), rank).name, cfg.logging.log_level)
    runtime = init_distributed()
    try:
        with Trainer(cfg, runtime) as trainer:
            yield trainer
    finally:
        destroy_distributed()


def run(cfg: MimoConfig) -> int:
    """The whole training process of one torchrun rank; returns its exit code."""
    budget = cfg.training.exit_duration_in_mins
    stop = StopRequests(exit_duration_s=budget * 60 if budget else None).install()
    try:
        with started_trainer(cfg) as trainer:
            if trainer.sinks.active:
                logger.info("layout: %s", trainer.job.topology.describe())
                logger.info("config %s: %s", cfg.name, json.dumps(cfg.to_dict(), sort_keys=True))
            if trainer.load() and trainer.checkpoints.loaded_from.finetune:
                logger.info("loaded the weights of %s (--finetune): training starts at iteration 0",
                            trainer.checkpoints.loaded_from.load)
            elif trainer.state.iteration:
                logger.info("resuming at iteration %d (%d samples consumed)",
                            trainer.state.iteration, trainer.state.consumed_samples)
            trainer.run(stop)
            state = trainer.state
    finally:
        stop.uninstall()
    if state.stopped_early:
        logger.warning("stopped early at iteration %d; exit code %d means 'resume me'",
                       state.iteration, EXIT_STOPPED_EARLY)
        return EXIT_STOPPED_EARLY
    return 0
