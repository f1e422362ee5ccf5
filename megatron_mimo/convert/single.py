"""The whole model in one process: conversion, generation and the TP1 reference all need both
branches side by side, without torchrun.

A world of one rank (gloo, a file store in a temporary folder: no port to pick) gives megatron-core
the process groups it asks for; the branches are built by the same spec builders as training and
assembled in megatron-core's colocated ``MimoModel``, so the parameter names and the checkpoint
keys are those of a training run, whatever the layout it used.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core.models.mimo import MimoModel, MimoModelConfig
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_mimo.compat.mcore import apply_branch_tp_group
from megatron_mimo.config.layout import IMAGES, LANGUAGE, ParallelismConfig
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.distributed.runtime import prepare_process, select_runtime
from megatron_mimo.distributed.topology import single_rank_groups
from megatron_mimo.models.common import branch_init_seed
from megatron_mimo.models.mimo import language_spec
from megatron_mimo.models.vision import images_submodule_spec
from megatron_mimo.training.seeding import seed_rank

SINGLE_LAYOUT = {IMAGES: ParallelismConfig(tp=1, dp=1, pp=1, offset=0),
                 LANGUAGE: ParallelismConfig(tp=1, dp=1, pp=1, offset=1)}
"""The layout a one-process model corresponds to: one rank per branch (the branches are built
at TP1/PP1; the offsets only keep the config valid, as two ranks would run it)."""


@contextlib.contextmanager
def one_process_world() -> Iterator[ProcessGroupCollection]:
    """A torch.distributed world of this process alone, with megatron-core's process groups;
    torn down on exit (also on error). Runs on the CPU: conversion and generation need no GPU.
    A world of one that already exists (a test worker's) is used and left in place."""
    runtime = select_runtime("cpu")
    prepare_process(runtime)
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("one_process_world runs in a world of one process, not "
                               f"{dist.get_world_size()}")
        yield single_rank_groups()
        return
    with tempfile.TemporaryDirectory(prefix="mimo-world-") as folder:
        store = dist.FileStore(f"{folder}/store", 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield single_rank_groups()
        finally:
            dist.destroy_process_group()


def single_config(cfg: MimoConfig) -> MimoConfig:
    """``cfg`` at one rank per branch, one sample per step (the model sections unchanged)."""
    from dataclasses import replace

    from megatron_mimo.config.schema import TrainingConfig

    training = TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=1,
                              seed=cfg.training.seed)
    return replace(cfg, images_parallel=SINGLE_LAYOUT[IMAGES],
                   language_parallel=SINGLE_LAYOUT[LANGUAGE], training=training)


def build_model(cfg: MimoConfig, pgs: ProcessGroupCollection, meta: bool = False) -> MimoModel:
    """Both branches at TP1/PP1 in one colocated ``MimoModel`` on the CPU, in fp32.

    ``meta``: parameters without storage (the caller assigns real tensors), so a 7B model costs
    no memory until its weights are read. Otherwise each branch is initialised from its own
    seed, as in training."""
    device = torch.device("cpu")
    cfg = single_config(cfg)
    with torch.device("meta") if meta else contextlib.nullcontext():
        torch.manual_seed(branch_init_seed(cfg.training.seed, IMAGES))
        images = images_submodule_spec(cfg.images, cfg.language.hidden_size, 1, pgs, device)
        language = language_spec(cfg, pgs, device)
        model = MimoModel(MimoModelConfig(
            language_model_spec=language, modality_submodules_spec={IMAGES: images},
            special_token_ids={IMAGES: cfg.language.image_token_id}))
    if meta:
        _materialise_attributes(model)
    apply_branch_tp_group(model, pgs.tp)
    seed_rank(cfg.training.seed, LANGUAGE, tp_rank=0)  # the dropout streams forward reads
    return model


def _materialise_attributes(model: torch.nn.Module) -> None:
    """Tensors the modules keep outside parameters and buffers were created on the meta device
    too; recreate them on the CPU (``CLIPViTModel.position_ids`` is the only one megatron-core
    has in the branches we build, and an unknown one is an error, not garbage)."""
    for name, module in model.named_modules():
        for attribute, value in list(vars(module).items()):
            if not (isinstance(value, torch.Tensor) and value.is_meta):
                continue
            if attribute != "position_ids":
                raise RuntimeError(f"{name}.{attribute}: a tensor on the meta device that "
                                   f"build_model does not know how to create")
            setattr(module, attribute, torch.arange(value.shape[-1]).expand(1, -1))


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of the model's state dict (``_extra_state`` entries dropped: they hold None)."""
    return {name: value for name, value in model.state_dict().items()
            if isinstance(value, torch.Tensor)}


def branch_of(name: str) -> str:
    """Branch a parameter name belongs to."""
    return IMAGES if name.startswith("modality_submodules.") else LANGUAGE
