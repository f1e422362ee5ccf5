"""Forward/backward of one global batch through megatron-core's multi-module 1F1B schedule.

Every step runs it, with one language stage or many (``--llm-pp N``). The encoder ranks (images,
and audio with an audio branch) are the first modules of the pipeline, the language stages
follow; megatron-core's ``MultiModulePipelineCommunicator`` moves activations and gradients over
one bridge per encoder (encoder -> language stage 0) and point-to-point between language stages, and its
``forward_backward_pipelining_without_interleaving`` (given a
``MultiModuleProcessGroupCollection``) runs warmup / 1F1B / cooldown on every rank. This module
only provides what the schedule asks of a user: the communicator, the per-rank data iterator,
the forward step and the loss function (a per-token sum; the global token count divides the
gradients after the grad sync, :mod:`megatron_mimo.training.step`), and the timing of the
communication, installed once per job (:func:`time_communication`).

A fully frozen images branch (``--freeze-vit --freeze-projection``) returns an output without
``grad_fn``: megatron-core's ``backward_step_multimodule`` skips its backward. The bridge exchange
stays the same on both sides: language stage 0 receives the activation with ``requires_grad``
(``BridgeCommunicator.recv_forward``), so it always computes and sends the gradient back, and the
images ranks receive it and drop it.

What must stay true: every layout trains like the single-rank reference, one language stage or
several (``tests/distributed/test_hetero_training.py``), and a resumed run's records equal the
uninterrupted run's bit for bit (``tests/distributed/test_checkpoint_resume.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial, wraps

import torch
from megatron.core.models.mimo import MimoModel
from megatron.core.models.mimo.config.role import MIMO_LANGUAGE_MODULE_KEY
from megatron.core.pipeline_parallel.multimodule_communicator import (
    MultiModulePipelineCommunicator,
)
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_pipelining_without_interleaving,
)
from megatron.core.process_groups_config import MultiModuleProcessGroupCollection

from megatron_mimo.config.layout import AUDIO, IMAGES, LANGUAGE
from megatron_mimo.data.source import AUDIO_ANSWER_FIELD, TEXT_FIELDS, Batch
from megatron_mimo.distributed.topology import Topology
from megatron_mimo.models.language import count_correct_answers
from megatron_mimo.models.vision import images_inputs
from megatron_mimo.training.state import BatchSums
from megatron_mimo.training.timing import PhaseTimer

if MIMO_LANGUAGE_MODULE_KEY != LANGUAGE:  # the schedule routes language stages by this key
    raise ImportError(f"megatron-core names the language module {MIMO_LANGUAGE_MODULE_KEY!r}, "
                      f"this package {LANGUAGE!r}")

ENCODER_INPUTS = {IMAGES: ("pixels", images_inputs), AUDIO: ("audio", None)}
"""Per encoder: the batch field it reads and how it becomes ``modality_inputs[encoder]`` (the
audio builder is imported with the audio model, only by jobs that have that branch)."""


def pipeline_topology(encoders: tuple[str, ...]) -> dict[str, list[str]]:
    """Module DAG of the pipeline: every encoder feeds the first language stage."""
    return {**{encoder: [LANGUAGE] for encoder in encoders}, LANGUAGE: []}


COMM_METHODS = ("recv_forward", "send_forward", "send_forward_recv_backward",
                "send_backward_recv_forward", "recv_backward", "send_backward")
"""Calls the schedule makes on the bridge and P2P communicators (timed: transfer and bubble)."""

COMPUTED_ELSEWHERE = ("forward", "bridge", "p2p")
"""Phases timed inside the schedule; the rest of its time is ``backward`` (backward passes and
the schedule's bookkeeping)."""


def build_pipeline_communicator(topology: Topology, model: MimoModel
                                ) -> MultiModulePipelineCommunicator:
    """A bridge per encoder -> language stage 0 plus P2P between language stages (collective:
    every rank builds it, bridges in branch order). Language activations are ``[s, b, h]``; an
    encoder's output is 2-D ``[tokens, h]`` (without ``module_output_ndim`` gloo aborts on a
    shape-buffer mismatch)."""
    encoders = tuple(name for name in topology.branches if name != LANGUAGE)
    return MultiModulePipelineCommunicator(
        {name: topology.grid(name) for name in topology.branches}, pipeline_topology(encoders),
        model.config, dim_mapping={"s": 0, "b": 1, "h": 2},
        module_output_ndim=dict.fromkeys(encoders, 2))


def schedule_process_groups(topology: Topology) -> MultiModuleProcessGroupCollection:
    """This rank's branch groups in the form the multi-module schedule takes."""
    branch = topology.my_branch
    return MultiModuleProcessGroupCollection(
        module_pgs={branch: topology.pgs()},
        language_model_module_name=LANGUAGE if branch == LANGUAGE else None)


def _per_token_loss(loss_mask: torch.Tensor, loss_scale: float, extra: dict[str, torch.Tensor],
                    token_loss: torch.Tensor):
    """Loss function of the last stage: (sum to backprop, token count, what the step reports,
    keyed by :class:`BatchSums` field). The schedule divides nothing
    (``calculate_per_token_loss``); the world token count divides the gradients after the grad
    sync."""
    loss_sum = (token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum()
    reported = {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.detach().float()}
    return loss_sum * loss_scale, num_tokens.int(), {**reported, **extra}


def encoder_inputs(branch: str) -> tuple[str, Callable]:
    """(batch field, ``modality_inputs`` builder) of encoder ``branch``."""
    field, build = ENCODER_INPUTS[branch]
    if build is None:
        from megatron_mimo.models.audio import audio_inputs as build
    return field, build


def make_forward_step(job, forward_only: bool) -> Callable:
    """The ``forward_step_func`` of this rank: encoder ranks encode their media; language stages run
    their layers (stage 0 merges the received image embeddings, the last stage the loss, and in
    evaluation a second, logits-only pass that counts the correct answers)."""
    device, dtype, timer = job.runtime.device, job.dtype, job.timer
    # fp16: the loss scale (1 otherwise; unscaled in prepare_grads), read once per global batch
    scale = 1.0 if forward_only else job.optimizer.get_loss_scale().item()

    # an encoder rank's batch field and input builder, resolved once per global batch
    field, build = encoder_inputs(job.branch) if job.branch != LANGUAGE else (None, None)

    def encoder_step(micro: Batch, model):
        media = micro[field].to(device, dtype)
        outputs, _ = model(input_ids=None, modality_inputs={job.branch: build(media)})
        # Float16Module returns fp32 on a last stage; the bridge carries the training dtype
        return {job.branch: outputs[job.branch].to(dtype)}, None

    def language_forward(model, batch: dict[str, torch.Tensor], labels: bool):
        output, _ = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          attention_mask=None, loss_mask=batch["loss_mask"],
                          labels=batch["labels"] if labels else None)
        return output

    def language_step(micro: Batch, model):
        batch = {k: micro[k].to(device) for k in TEXT_FIELDS}
        output = language_forward(model, batch, labels=True)
        extra = {}
        if forward_only and job.is_last_stage():
            logits = language_forward(model, batch, labels=False)
            tp = job.topology.pgs().tp
            extra = {"correct": count_correct_answers(logits, batch, tp),
                     "answers": torch.tensor(float(len(micro["keys"])), device=device)}
            if AUDIO_ANSWER_FIELD in micro:  # the clip's answer word, with an audio branch
                at_clip = {**batch, "answer_position": micro[AUDIO_ANSWER_FIELD].to(device)}
                extra["audio_correct"] = count_correct_answers(logits, at_clip, tp)
        return output, partial(_per_token_loss, batch["loss_mask"], scale, extra)

    step = language_step if job.branch == LANGUAGE else encoder_step

    def forward_step(data_iterator: Iterator[Batch], model):
        with timer("forward"), torch.set_grad_enabled(not forward_only):
            return step(next(data_iterator), model)

    return forward_step


def _comm_parts(communicator: MultiModulePipelineCommunicator) -> list[tuple[str, object]]:
    """(phase, object) of every bridge and P2P communicator this rank's schedule calls."""
    parts = [("bridge", bridge) for bridge in communicator.bridge_comms]
    parts += [("p2p", info.p2p_communicator) for info in communicator.rank_module_map.values()]
    return parts


def time_communication(communicator: MultiModulePipelineCommunicator, timer: PhaseTimer) -> None:
    """Route every bridge and P2P call of this rank's schedule through ``timer('bridge' / 'p2p')``
    for the life of the communicator (the job calls it once, when it is built). The time includes
    waiting for the peer, i.e. the pipeline bubble."""
    for phase, part in _comm_parts(communicator):
        for name in COMM_METHODS:
            if not hasattr(type(part), name):
                continue
            if name in vars(part):
                raise RuntimeError(f"{type(part).__name__}.{name} is timed already")
            setattr(part, name, _timed(getattr(part, name), timer, phase))


def _timed(method: Callable, timer: PhaseTimer, phase: str) -> Callable:
    @wraps(method)
    def timed(*args, **kwargs):
        with timer(phase):
            return method(*args, **kwargs)

    return timed


def pipeline_forward_backward(job, batches: list[Batch], forward_only: bool) -> torch.Tensor:
    """Run every micro-batch of one global batch through the 1F1B schedule, timing its phases in
    ``job.timer``; return this rank's :class:`BatchSums` as a tensor (non-zero on the last
    language stage only)."""
    with job.timer.remainder("backward", excluding=COMPUTED_ELSEWHERE):
        reported = forward_backward_pipelining_without_interleaving(
            forward_step_func=make_forward_step(job, forward_only),
            data_iterator=iter(batches), model=[job.model], num_microbatches=len(batches),
            seq_length=job.cfg.language.seq_length,
            micro_batch_size=job.cfg.branch_micro_batch(job.branch),
            forward_only=forward_only, p2p_communicator=job.pipeline,
            pg_collection=job.schedule_pgs)
    return sum_reported(reported, job.runtime.device)


def sum_reported(reported: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The micro-batches' reports summed per :class:`BatchSums` column, in fp32 on ``device``
    (a key that is no field raises: nothing reported is dropped)."""
    sums = BatchSums().to_tensor(device)
    for item in reported:
        for name, value in item.items():
            sums[BatchSums.column(name)] += value.to(device)
    return sums
