"""One training step and one evaluation pass of a built :class:`~megatron_mimo.training.job.Job`.

A step, on every rank of the world, in this order:
1. the global batch's micro-batches through megatron-core's multi-module 1F1B schedule
   (:mod:`.pipeline`): images ranks encode and send over the bridge to the first language stage,
   language stages pass activations on, the last one computes the per-token loss; gradients
   flow back the same way, down to the encoder;
2. per-branch DP grad sync (DDP, summed), then one world all-reduce of (loss sum, token count)
   and every gradient scaled by 1 / global token count (the loss is a mean over all tokens);
3. ``MimoOptimizer.step()`` (world-agreed found-inf, grad norm, success);
4. every branch's scheduler advances only if the world agreed the step succeeded.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_mimo.config.layout import LANGUAGE
from megatron_mimo.training.job import Job
from megatron_mimo.training.pipeline import pipeline_forward_backward
from megatron_mimo.training.state import EvalResult, StepResult

logger = logging.getLogger(__name__)


class PhaseTimer:
    """Wall time per named phase of a step on this rank (for the step-time breakdown)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - start) * 1e3


def world_sums(job: Job, sums: torch.Tensor) -> list[float]:
    """Sum per-rank totals over the world, counting each language DP replica once (its TP rank 0
    of the last pipeline stage, where the loss is)."""
    counts = job.branch == LANGUAGE and job.topology.tp_rank() == 0 and job.is_last_stage()
    totals = sums if counts else torch.zeros_like(sums)
    dist.all_reduce(totals)
    return totals.tolist()


def train_step(job: Job) -> StepResult:
    """One iteration on this rank, reading its part of the next global batch; every rank runs
    the same world collectives in the same order."""
    timer = PhaseTimer()
    ddp = job.branch_ddp
    ddp.zero_grad_buffer()
    job.optimizer.zero_grad()
    with timer("data"):
        batches = job.data.next_global_batch()
    sums = pipeline_forward_backward(job, batches, timer, forward_only=False)
    with timer("grad_sync"):
        ddp.finish_grad_sync()
        total_loss, total_tokens, _, _ = world_sums(job, sums)
        total_tokens = int(total_tokens)
        ddp.scale_gradients(1.0 / max(total_tokens, 1))
    with timer("optimizer"):
        success, grad_norm, _ = job.optimizer.step()
    if success:
        job.schedulers.step()
    return StepResult(loss=total_loss / max(total_tokens, 1), num_tokens=total_tokens,
                      grad_norm=grad_norm, skipped=not success,
                      loss_scale=job.optimizer.get_loss_scale().item(), phase_ms=dict(timer.ms))


def evaluate(job: Job) -> EvalResult:
    """Mean per-token loss and answer accuracy over ``eval_iters`` held-out global batches
    (no gradients; the training data position does not move)."""
    timer = PhaseTimer()
    job.model.eval()
    totals = [0.0] * 4
    try:
        for batches in job.data.eval_batches(job.cfg.training.eval_iters):
            sums = world_sums(job, pipeline_forward_backward(job, batches, timer, forward_only=True))
            totals = [total + value for total, value in zip(totals, sums, strict=True)]
    finally:
        job.model.train()
    loss, tokens, correct, answers = totals
    return EvalResult(loss=loss / max(tokens, 1), accuracy=correct / max(answers, 1))
