"""One training step and one evaluation pass of a built :class:`~megatron_mimo.training.job.Job`.

A step, on every rank of the world, in this order:
1. the global batch's micro-batches through megatron-core's multi-module 1F1B schedule
   (:mod:`.pipeline`): images ranks encode and send over the bridge to the first language stage,
   language stages pass activations on, the last one computes the per-token loss; gradients
   flow back the same way, down to the encoder;
2. per-branch DP grad sync (DDP, summed), then one world all-reduce of the batch's
   :class:`~megatron_mimo.training.state.BatchSums` and every gradient scaled by
   1 / global token count (the loss is a mean over all tokens);
3. ``MimoOptimizer.step()`` (world-agreed found-inf, grad norm, success), the first thing that
   changes the parameters or optimizer state: a background checkpoint save copies them while
   1. and 2. run, and the step waits for that copy first (``before_update``);
4. every branch's scheduler advances only if the world agreed the step succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_mimo.config.layout import LANGUAGE
from megatron_mimo.models.freezing import train_mode
from megatron_mimo.training.job import Job
from megatron_mimo.training.pipeline import pipeline_forward_backward
from megatron_mimo.training.state import BatchSums, EvalResult, StepResult

logger = logging.getLogger(__name__)


def world_sums(job: Job, local: torch.Tensor) -> BatchSums:
    """Sum this rank's :class:`BatchSums` tensor over the world, counting each language DP
    replica once (its TP rank 0 of the last pipeline stage, where the loss is)."""
    counts = job.branch == LANGUAGE and job.topology.tp_rank() == 0 and job.is_last_stage()
    totals = local if counts else torch.zeros_like(local)
    dist.all_reduce(totals)
    return BatchSums.from_tensor(totals)


def train_step(job: Job, before_update: Callable[[], None] = lambda: None) -> StepResult:
    """One iteration on this rank, reading its part of the next global batch; every rank runs
    the same world collectives in the same order. Its phase times come from ``job.timer``.
    ``before_update`` runs right before the parameters and optimizer state change."""
    timer = job.timer
    timer.reset()
    ddp = job.branch_ddp
    ddp.zero_grad_buffer()
    job.optimizer.zero_grad()
    with timer("data"):
        batches = job.data.next_global_batch()
    local = pipeline_forward_backward(job, batches, forward_only=False)
    with timer("grad_sync"):
        ddp.finish_grad_sync()
        sums = world_sums(job, local)
        num_tokens = int(sums.num_tokens)
        ddp.scale_gradients(1.0 / max(num_tokens, 1))
    with timer("optimizer"):
        before_update()
        success, grad_norm, _ = job.optimizer.step()
    if success:
        job.schedulers.step()
    return StepResult(loss=sums.loss_sum / max(num_tokens, 1), num_tokens=num_tokens,
                      grad_norm=grad_norm, skipped=not success,
                      loss_scale=job.optimizer.get_loss_scale().item(), phase_ms=timer.read())


def evaluate(job: Job) -> EvalResult:
    """Mean per-token loss and answer accuracy over ``eval_iters`` held-out global batches
    (no gradients; the training data position does not move; its phase times are dropped)."""
    job.model.eval()
    totals = BatchSums()
    try:
        for batches in job.data.eval_batches(job.cfg.training.eval_iters):
            totals += world_sums(job, pipeline_forward_backward(job, batches, forward_only=True))
    finally:
        train_mode(job.model)  # frozen modules (--freeze-*) stay in eval mode
        job.timer.reset()
    audio = totals.audio_correct / max(totals.answers, 1) if job.cfg.audio_model else None
    return EvalResult(loss=totals.loss_sum / max(totals.num_tokens, 1),
                      accuracy=totals.correct / max(totals.answers, 1), audio_accuracy=audio)
