"""One training step and one evaluation pass of a built :class:`~megatron_mimo.training.job.Job`.

A step, on every rank of the world, in this order:
1. micro-steps: images ranks encode and send over the bridge, then backprop the gradient that
   comes back (encoding the next micro-step while the language ranks work on the current one);
   language ranks receive, run the LLM with per-token loss, backprop, send the embedding
   gradient back;
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

from megatron_mimo.config.layout import IMAGES, LANGUAGE
from megatron_mimo.data.mock import EVAL_INDEX_BASE
from megatron_mimo.models.vision import images_inputs
from megatron_mimo.training.job import Job
from megatron_mimo.training.pipeline import pipeline_forward_backward
from megatron_mimo.training.state import StepResult

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


def _images_forward(job: Job, indices: list[int], timer: PhaseTimer,
                    forward_only: bool) -> torch.Tensor:
    pixels = job.dataset.pixels(indices).to(job.runtime.device, job.dtype)
    with timer("images"), torch.set_grad_enabled(not forward_only):
        outputs, _ = job.model(input_ids=None, modality_inputs={IMAGES: images_inputs(pixels)})
    # Float16Module returns fp32 on a last stage; the bridge carries the training dtype
    return outputs[IMAGES].to(job.dtype)


def _images_steps(job: Job, indices: list[list[int]], timer: PhaseTimer, forward_only: bool) -> None:
    """Images side of one global batch. The encoder computes micro-step m+1 while the language
    ranks work on m: send F0; then per m: forward m+1, receive grad m, backward m, send F(m+1).
    Bridge calls pair up in the order the language side makes them (recv F m, send grad m)."""
    if forward_only:
        for micro in indices:
            embeddings = _images_forward(job, micro, timer, forward_only=True)
            with timer("bridge"):
                job.bridge.send_forward(embeddings)
        return
    pending = _images_forward(job, indices[0], timer, forward_only=False)
    with timer("bridge"):
        job.bridge.send_forward(pending.detach())
    for step in range(len(indices)):
        upcoming = None
        if step + 1 < len(indices):
            upcoming = _images_forward(job, indices[step + 1], timer, forward_only=False)
        with timer("bridge"):
            grad = job.bridge.recv_backward()
        with timer("images"):
            torch.autograd.backward(pending, grad)
        if upcoming is not None:
            with timer("bridge"):
                job.bridge.send_forward(upcoming.detach())
            pending = upcoming


def _language_micro_step(job: Job, indices: list[int], timer: PhaseTimer,
                         forward_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch = {k: v.to(job.runtime.device) for k, v in job.dataset.tokens(indices).items()}
    with timer("bridge"):
        received = job.bridge.recv_forward()
    image_embeddings = received.detach().requires_grad_(not forward_only)
    with timer("language"), torch.set_grad_enabled(not forward_only):
        job.model.set_input_tensor({IMAGES: image_embeddings})
        token_loss, _ = job.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  attention_mask=None, loss_mask=batch["loss_mask"],
                                  labels=batch["labels"])
        loss_sum = (token_loss.float() * batch["loss_mask"]).sum()
        if not forward_only:  # fp16: the loss scale (1 otherwise); unscaled in prepare_grads
            (loss_sum * job.optimizer.get_loss_scale().item()).backward()
    if not forward_only:
        with timer("bridge"):
            job.bridge.send_backward(image_embeddings.grad)
    return loss_sum.detach(), batch["loss_mask"].sum()


def forward_backward(job: Job, consumed_samples: int, timer: PhaseTimer, forward_only: bool = False,
                     index_base: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every micro-step of one global batch; return this rank's (loss sum, token count).
    With language PP > 1 megatron-core's 1F1B schedule runs them (:mod:`.pipeline`)."""
    loss_sum = torch.zeros((), device=job.runtime.device)
    tokens = torch.zeros((), device=job.runtime.device)
    indices = [job.sampler.indices(consumed_samples, micro_step, base=index_base)
               for micro_step in range(job.cfg.num_microbatches)]
    if job.pipelined:
        return pipeline_forward_backward(job, indices, timer, forward_only)
    if job.branch == IMAGES:
        _images_steps(job, indices, timer, forward_only)
        return loss_sum, tokens
    for micro in indices:
        micro_loss, micro_tokens = _language_micro_step(job, micro, timer, forward_only)
        loss_sum += micro_loss
        tokens += micro_tokens
    return loss_sum, tokens


def world_loss_and_tokens(job: Job, loss_sum: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """Sum (loss, tokens) over the world, counting each language DP replica once (its TP rank 0
    of the last pipeline stage, where the loss is)."""
    counts = job.branch == LANGUAGE and job.topology.tp_rank() == 0 and job.is_last_stage()
    totals = torch.stack([loss_sum, tokens]) if counts else torch.zeros(2, device=job.runtime.device)
    dist.all_reduce(totals)
    return totals[0].item(), int(totals[1].item())


def train_step(job: Job, consumed_samples: int) -> StepResult:
    """One iteration on this rank, reading the global batch after ``consumed_samples``; every
    rank runs the same world collectives in the same order."""
    timer = PhaseTimer()
    ddp = job.branch_ddp
    ddp.zero_grad_buffer()
    job.optimizer.zero_grad()
    loss_sum, tokens = forward_backward(job, consumed_samples, timer)
    with timer("grad_sync"):
        ddp.finish_grad_sync()
        total_loss, total_tokens = world_loss_and_tokens(job, loss_sum, tokens)
        ddp.scale_gradients(1.0 / max(total_tokens, 1))
    with timer("optimizer"):
        success, grad_norm, _ = job.optimizer.step()
    if success:
        job.schedulers.step()
    return StepResult(loss=total_loss / max(total_tokens, 1), num_tokens=total_tokens,
                      grad_norm=grad_norm, skipped=not success,
                      loss_scale=job.optimizer.get_loss_scale().item(), phase_ms=dict(timer.ms))


def evaluate(job: Job) -> float:
    """Mean per-token loss over ``eval_iters`` held-out global batches (no gradients)."""
    timer = PhaseTimer()
    job.model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        for batch in range(job.cfg.training.eval_iters):
            consumed = batch * job.cfg.training.global_batch_size
            loss_sum, tokens = forward_backward(job, consumed, timer, forward_only=True,
                                                index_base=EVAL_INDEX_BASE)
            batch_loss, batch_tokens = world_loss_and_tokens(job, loss_sum, tokens)
            total_loss += batch_loss
            total_tokens += batch_tokens
    finally:
        job.model.train()
    return total_loss / max(total_tokens, 1)
