"""The branches the GPU check builds: training's own builders (``megatron_mimo.models``), one
branch at a time in a one-rank world, with the package's spec choice or forced to the local spec;
the fixed inputs; the forward pass of one branch; the weights of a branch from a checkpoint."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import build_module

from megatron_mimo.compat.mcore import apply_branch_tp_group
from megatron_mimo.config import IMAGES, LANGUAGE, MimoConfig
from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.layout import branch_spec
from megatron_mimo.config.presets import get_preset
from megatron_mimo.distributed.runtime import Runtime, destroy_distributed, init_distributed
from megatron_mimo.distributed.topology import build_topology
from megatron_mimo.models.common import branch_init_seed
from megatron_mimo.models.mimo import language_spec
from megatron_mimo.models.vision import images_inputs, images_submodule_spec
from megatron_mimo.training.seeding import seed_rank

KINDS: dict[str, tuple[str, str]] = {
    "gpt": ("tiny_cpu", LANGUAGE), "vit": ("tiny_cpu", IMAGES),
    "radio": ("tiny_cpu_nemotron", IMAGES), "mamba_hybrid": ("tiny_cpu_nemotron", LANGUAGE)}
"""Branch kind -> (preset it comes from, side)."""

TWO_RANK_FLAGS = ("--encoder-dp", "1", "--llm-tp", "1", "--llm-offset", "1")
"""Images TP1xDP1 on rank 0, language TP1xDP1 on rank 1: the smallest world of two branches."""

_TWO_RANK_FIELDS = {"images_parallel.dp": 1, "language_parallel.tp": 1,
                    "language_parallel.offset": 1}

LOCAL_SPEC_CHOOSERS = ("megatron_mimo.models.vision", "megatron_mimo.models.language",
                       "megatron_mimo.models.hybrid")
"""Modules whose builders choose the TE spec by calling their ``te_available(device)``."""

CHECKPOINT_PREFIX = {IMAGES: f"modality_submodules.{IMAGES}.", LANGUAGE: "language_model."}
"""Where a branch's weights sit in a checkpoint of the whole model (``MimoModel`` keys)."""

INPUT_SEED, INPUT_BATCH = 4242, 2


def preset_config(preset: str, precision: str = "fp32") -> MimoConfig:
    """``preset`` in the two-rank layout (TP1 everywhere), at ``precision``."""
    fields = {**_TWO_RANK_FIELDS, "precision.bf16": precision == "bf16"}
    return apply_overrides(get_preset(preset), fields)


@contextlib.contextmanager
def solo_world(runtime: Runtime) -> Iterator[ProcessGroupCollection]:
    """A one-rank world on ``runtime`` and the process groups of one branch covering it."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "0"}  # the only rank binds any free port itself: nothing to race for
    with mock.patch.dict(os.environ, env):
        init_distributed(runtime)
    topology = build_topology([branch_spec("solo")])
    try:
        yield topology.pgs()
    finally:
        topology.destroy()
        destroy_distributed()


@contextlib.contextmanager
def local_specs() -> Iterator[None]:
    """Inside: the builders choose the local spec on any device."""
    with contextlib.ExitStack() as stack:
        for module in LOCAL_SPEC_CHOOSERS:
            stack.enter_context(mock.patch(f"{module}.te_available", lambda device: False))
        yield


def build_side(cfg: MimoConfig, side: str, pgs: ProcessGroupCollection,
               device: torch.device) -> torch.nn.Module:
    """One branch of ``cfg`` as training builds it (same seeds), on ``device``."""
    seed = cfg.training.seed
    seed_rank(seed, side, 0)
    torch.manual_seed(branch_init_seed(seed, side))
    if side == IMAGES:
        module = VisionModalitySubmodules.from_spec(images_submodule_spec(
            cfg.images, cfg.language.hidden_size, 1, pgs, device, cfg.precision.name))
    else:
        module = build_module(language_spec(cfg, pgs, device))
    module.to(device)
    apply_branch_tp_group(module, pgs.tp)
    return module


def branch_input(cfg: MimoConfig, side: str) -> torch.Tensor:
    """The fixed input of a side, on the CPU: images ``[b, 3, H, W]`` or token ids ``[b, s]``."""
    gen = torch.Generator().manual_seed(INPUT_SEED)
    if side == IMAGES:
        size = cfg.images.image_size
        return torch.randn(INPUT_BATCH, 3, size, size, generator=gen)
    shape = (INPUT_BATCH, cfg.language.seq_length)
    return torch.randint(0, cfg.language.vocab_size, shape, generator=gen)


def run_side(module: torch.nn.Module, side: str, x: torch.Tensor) -> torch.Tensor:
    """Forward of one branch: image embeddings ``[tokens, h]`` or logits ``[b, s, vocab]``."""
    if side == IMAGES:
        return module(encoder_inputs=images_inputs(x))
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
    return module(input_ids=x, position_ids=positions, attention_mask=None)


def evaluate_side(module: torch.nn.Module, cfg: MimoConfig, side: str,
                  device: torch.device) -> torch.Tensor:
    """``run_side`` on the fixed input without dropout or gradients; the output in fp32."""
    module.eval()
    with torch.no_grad():
        return run_side(module, side, branch_input(cfg, side).to(device)).float()


def uses_transformer_engine(module: torch.nn.Module) -> bool:
    """Whether any submodule is a Transformer Engine module."""
    return any(type(m).__module__.startswith(("transformer_engine", "megatron.core.extensions"))
               for m in module.modules())


def _sharded_state(module: torch.nn.Module, side: str) -> dict:
    """The module's sharded state dict under the keys a whole-model checkpoint uses."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
    from megatron.core.transformer.utils import sharded_state_dict_default

    if side == IMAGES:
        sharded = module.sharded_state_dict("", (), None)
    else:  # as MimoModel does: the language model's dp_cp group comes from its pg_collection
        sharded = sharded_state_dict_default(
            module, "", (), {"dp_cp_group": module.pg_collection.dp_cp})
    replace_prefix_for_sharding(sharded, "", CHECKPOINT_PREFIX[side])
    return sharded


def load_side(module: torch.nn.Module, side: str, root: Path) -> int:
    """Load a branch's weights from the latest checkpoint under ``root`` as the Trainer's
    ``--finetune`` does (megatron-core's ``dist_checkpointing.load`` of the model's sharded state
    dict, then a strict ``load_state_dict``); returns the tensors loaded."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from megatron_mimo.checkpoint import storage

    directory = storage.checkpoint_dir(root, storage.read_tracker(root))
    loaded = dist_checkpointing.load({"model": _sharded_state(module, side)}, str(directory),
                                     sharded_strategy=TorchDistLoadShardedStrategy(),
                                     validate_access_integrity=True)["model"]
    module.load_state_dict(loaded, strict=True)
    return sum(isinstance(value, torch.Tensor) for value in loaded.values())
