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
from megatron_mimo.data.source import TEXT_FIELDS, Batch
from megatron_mimo.models.language import count_correct_answers
from megatron_mimo.models.vision import images_inputs
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


def _images_forward(job: Job, batch: Batch, timer: PhaseTimer,
                    forward_only: bool) -> torch.Tensor:
    pixels = batch["pixels"].to(job.runtime.device, job.dtype)
    with timer("images"), torch.set_grad_enabled(not forward_only):
        outputs, _ = job.model(input_ids=None, modality_inputs={IMAGES: images_inputs(pixels)})
    # Float16Module returns fp32 on a last stage; the bridge carries the training dtype
    return outputs[IMAGES].to(job.dtype)


def _images_steps(job: Job, batches: list[Batch], timer: PhaseTimer, forward_only: bool) -> None:
    """Images side of one global batch. The encoder computes micro-step m+1 while the language
    ranks work on m: send F0; then per m: forward m+1, receive grad m, backward m, send F(m+1).
    Bridge calls pair up in the order the language side makes them (recv F m, send grad m)."""
    if forward_only:
        for micro in batches:
            embeddings = _images_forward(job, micro, timer, forward_only=True)
            with timer("bridge"):
                job.bridge.send_forward(embeddings)
        return
    pending = _images_forward(job, batches[0], timer, forward_only=False)
    with timer("bridge"):
        job.bridge.send_forward(pending.detach())
    for step in range(len(batches)):
        upcoming = None
        if step + 1 < len(batches):
            upcoming = _images_forward(job, batches[step + 1], timer, forward_only=False)
        with timer("bridge"):
            grad = job.bridge.recv_backward()
        with timer("images"):
            torch.autograd.backward(pending, grad)
        if upcoming is not None:
            with timer("bridge"):
                job.bridge.send_forward(upcoming.detach())
            pending = upcoming


def _language_forward(job: Job, batch: dict[str, torch.Tensor],
                      image_embeddings: torch.Tensor, labels: bool) -> torch.Tensor:
    """Per-token loss (``labels``) or this TP rank's vocabulary slice of the logits."""
    job.model.set_input_tensor({IMAGES: image_embeddings})
    output, _ = job.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          attention_mask=None, loss_mask=batch["loss_mask"],
                          labels=batch["labels"] if labels else None)
    return output


def _language_micro_step(job: Job, micro: Batch, timer: PhaseTimer,
                         forward_only: bool) -> torch.Tensor:
    """(loss sum, loss tokens, correct answers, answers) of one micro-batch on this rank."""
    batch = {k: micro[k].to(job.runtime.device) for k in TEXT_FIELDS}
    with timer("bridge"):
        received = job.bridge.recv_forward()
    image_embeddings = received.detach().requires_grad_(not forward_only)
    with timer("language"), torch.set_grad_enabled(not forward_only):
        token_loss = _language_forward(job, batch, image_embeddings, labels=True)
        loss_sum = (token_loss.float() * batch["loss_mask"]).sum()
        if not forward_only:  # fp16: the loss scale (1 otherwise); unscaled in prepare_grads
            (loss_sum * job.optimizer.get_loss_scale().item()).backward()
    if not forward_only:
        with timer("bridge"):
            job.bridge.send_backward(image_embeddings.grad)
        correct = torch.zeros((), device=job.runtime.device)
    else:
        with timer("language"), torch.no_grad():
            logits = _language_forward(job, batch, image_embeddings, labels=False)
            correct = count_correct_answers(logits, batch, job.topology.pgs().tp)
    answers = torch.tensor(float(len(micro["keys"])), device=job.runtime.device)
    return torch.stack([loss_sum.detach(), batch["loss_mask"].sum(), correct, answers])


def forward_backward(job: Job, batches: list[Batch], timer: PhaseTimer,
                     forward_only: bool = False) -> torch.Tensor:
    """Run every micro-step of one global batch; return this rank's sums (loss, loss tokens,
    correct answers, answers); zeros on images ranks. With language PP > 1 megatron-core's 1F1B
    schedule runs them (:mod:`.pipeline`)."""
    if job.pipelined:
        return pipeline_forward_backward(job, batches, timer, forward_only)
    sums = torch.zeros(4, device=job.runtime.device)
    if job.branch == IMAGES:
        _images_steps(job, batches, timer, forward_only)
        return sums
    for micro in batches:
        sums += _language_micro_step(job, micro, timer, forward_only)
    return sums


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
    sums = forward_backward(job, batches, timer)
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
            sums = world_sums(job, forward_backward(job, batches, timer, forward_only=True))
            totals = [total + value for total, value in zip(totals, sums, strict=True)]
    finally:
        job.model.train()
    loss, tokens, correct, answers = totals
    return EvalResult(loss=loss / max(tokens, 1), accuracy=correct / max(answers, 1))
