"""Pipeline stages of the language branch: which stage builds what, and an initialisation that
does not depend on how the layers are split over stages.

A stage's ``GPTModel`` builds only its layers when the config carries
``pipeline_model_parallel_size`` and the stage's ``pre_process`` (embedding) / ``post_process``
(final norm, output layer, loss). Without ``pipeline_model_parallel_size`` megatron-core builds
every layer on every stage and nothing fails (``TransformerBlock`` counts a stage's layers from
it), so both come from here together.

Weights: with CPU initialisation each layer draws from the default generator in build order, so
a stage that starts at layer k would draw other numbers than the same layer in a one-stage build.
Each layer therefore reseeds the generator from (branch seed, global layer number) right before
it is built: PP1 and PPn start from identical weights. A GPT layer gets its stage-local number
and adds megatron-core's stage offset; a Mamba-hybrid layer gets its global number from
``HybridStack`` (which splits the pattern over the stages itself, at the ``|`` marks).
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

LAYER_SEED_STRIDE = 7919
"""Distance between the seeds of consecutive layers (a prime, so no layer shares a seed with
the branch seed of the other branch)."""


def stage_of(pgs: ProcessGroupCollection | None) -> tuple[int, int]:
    """(stage index, number of stages) of this rank in its branch; (0, 1) outside the branch."""
    if pgs is None:
        return 0, 1
    return pgs.pp.rank(), pgs.pp.size()


def stage_flags(pgs: ProcessGroupCollection | None) -> dict[str, bool]:
    """``pre_process`` (embedding) on the first stage, ``post_process`` (output, loss) on the
    last; ranks outside the branch build nothing, so both are True there."""
    stage, num_stages = stage_of(pgs)
    return {"pre_process": stage == 0, "post_process": stage == num_stages - 1}


def layer_seed(init_seed: int, global_layer_number: int) -> int:
    """Seed the default generator gets right before global layer ``global_layer_number``
    (1-based) is built."""
    return init_seed + LAYER_SEED_STRIDE * global_layer_number


@functools.cache
def _seeded_class(layer_class: type) -> type:
    """``layer_class`` that reseeds the default generator from its global layer number."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int = 0,
                 pg_collection=None, vp_stage=None, **kwargs):
        pp_rank = pg_collection.pp.rank() if pg_collection is not None else 0
        offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        torch.manual_seed(layer_seed(init_seed, layer_number + offset))
        layer_class.__init__(self, config, submodules, layer_number, *args,
                             pg_collection=pg_collection, vp_stage=vp_stage, **kwargs)

    return type(f"StageIndependent{layer_class.__name__}", (layer_class,), {
        "__init__": __init__, "__doc__": _seeded_class.__doc__})


def apply_layer_seeding(layer_spec: ModuleSpec, init_seed: int) -> ModuleSpec:
    """A copy of a transformer-layer spec whose layers initialise independently of the stage
    split (see the module docstring)."""
    if not (isinstance(layer_spec.module, type) and issubclass(layer_spec.module, TransformerLayer)):
        raise TypeError(f"expected a TransformerLayer spec, got {layer_spec.module!r}")
    return ModuleSpec(module=_seeded_class(layer_spec.module), submodules=layer_spec.submodules,
                      params={**layer_spec.params, "init_seed": init_seed})


@functools.cache
def _seeded_hybrid_class(layer_class: type) -> type:
    """``layer_class`` (a layer of ``HybridStack``, built with its global ``layer_number``) that
    reseeds the default generator from that number."""

    def __init__(self, *args, init_seed: int = 0, **kwargs):
        torch.manual_seed(layer_seed(init_seed, kwargs["layer_number"]))
        layer_class.__init__(self, *args, **kwargs)

    return type(f"StageIndependent{layer_class.__name__}", (layer_class,), {
        "__init__": __init__, "__doc__": _seeded_hybrid_class.__doc__})


def seed_hybrid_layers(stack_spec: ModuleSpec, init_seed: int) -> ModuleSpec:
    """A copy of a ``HybridStack`` spec whose Mamba, attention and MLP layers initialise
    independently of the stage split."""
    submodules = copy.copy(stack_spec.submodules)
    for field in ("mamba_layer", "attention_layer", "mlp_layer"):
        layer = getattr(submodules, field)
        setattr(submodules, field, ModuleSpec(
            module=_seeded_hybrid_class(layer.module), submodules=layer.submodules,
            params={**layer.params, "init_seed": init_seed}))
    return ModuleSpec(module=stack_spec.module, submodules=submodules, params=stack_spec.params)
