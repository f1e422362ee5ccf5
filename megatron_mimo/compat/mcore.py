"""Device-independent workarounds for megatron-core: each named after its function, gated on
its real trigger.

These fail the same way on a GPU as on the CPU: a run without Transformer Engine/apex uses
torch's Adam and hits the same optimizer-state bugs; a job without ``parallel_state`` lacks the
buffers and groups ``initialize_model_parallel`` would have made. Each is proven necessary by a
test that fails without it (``tests/distributed/test_workarounds_needed.py``,
``tests/unit/test_compat_mcore.py`` and the resume tests named in ``docs/checkpointing.md``).
"""

from __future__ import annotations

import importlib.util
import queue
import re
from typing import Any

import torch

from megatron_mimo.compat.registry import workaround

# -- process workarounds --------------------------------------------------------------------


def _save_queue_missing() -> bool:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return filesystem_async._results_queue is None


@workaround(trigger="a torch_dist save while no write-results queue exists",
            remove_when="filesystem_async creates its results queue without a Manager process",
            process=True, needed=_save_queue_missing)
def in_process_save_queue() -> None:
    """A torch_dist save (sync, or async in a writer thread of this process) collects its write
    results through ``get_write_results_queue``, which on first use starts a *spawn*-context multiprocessing
    Manager: a new Python process that re-imports ``__main__`` (torch + megatron, seconds), for a
    queue the same process fills and drains. A plain queue does the job."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def _is_view_on_cpu(tensor: Any) -> bool:
    return (isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
            and tensor.is_contiguous()
            and tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size())


@workaround(trigger="a torch_dist save of CPU tensors that are views into a larger buffer",
            remove_when="megatron-core's writer stops cloning views of contiguous buffers")
def views_saved_without_copy(sharded: dict) -> int:
    """Give every CPU tensor of a save that is a view into a larger buffer (every weight is a
    view into DDP's contiguous parameter buffer) an alias with a storage of exactly its own
    bytes; return how many. megatron-core's writer clones such views before writing (so that
    ``torch.save`` does not write the whole buffer), which costs a copy of the model inside the
    training loop — for an async save the whole stall. The alias shares the memory, so the
    bytes written are the same; an async save's staging copy is then the only copy."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    count = 0
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor) and _is_view_on_cpu(value.data):
            data = value.data.detach()
            raw = torch.from_numpy(data.reshape(-1).view(torch.uint8).numpy())
            value.data = raw.view(data.dtype).view(data.shape)
            count += 1
    return count


def _memory_buffer_missing() -> bool:
    from megatron.core import parallel_state

    return parallel_state._GLOBAL_MEMORY_BUFFER is None


@workaround(trigger="attention without initialize_model_parallel",
            remove_when="attention takes its memory buffer from the caller or makes its own",
            process=True, needed=_memory_buffer_missing)
def global_memory_buffer() -> None:
    """Attention reads megatron's global memory buffer, which only ``initialize_model_parallel``
    creates; creating it alone makes no process group."""
    from megatron.core import parallel_state

    parallel_state._set_global_memory_buffer()


def _transformer_engine_unusable() -> bool:
    return not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None


@workaround(trigger="a hybrid model without a usable Transformer Engine (no GPU or not installed)",
            remove_when="HybridStack builds its final norm from the layer spec",
            process=True, needed=_transformer_engine_unusable)
def hybrid_final_norm_is_local() -> None:
    """``HybridStack`` always builds its final norm as ``TENorm``, whatever the layer spec; without
    Transformer Engine that is a stub that raises. Use megatron's torch norm (same parameter
    name ``final_norm.weight``, honours ``config.normalization``)."""
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm


def uses_torch_adam_fallback() -> bool:
    """Whether megatron-core's optimizers fall back to torch's Adam (no TE, no apex)."""
    from megatron.core import optimizer

    return bool(optimizer.USING_PYTORCH_OPTIMIZER)


@workaround(trigger="a fully_reshardable optimizer load with torch's Adam (no TE/apex)",
            remove_when="the fully_reshardable load handles torch Adam's per-parameter step",
            process=True, needed=uses_torch_adam_fallback)
def fully_reshardable_load_keeps_adam_step() -> None:
    """``load_parameter_state_from_fully_reshardable`` leaves torch Adam's per-parameter ``step``
    out of the source tensors, but ``_set_main_param_and_optimizer_states`` then looks up every
    destination key, ``step`` included: KeyError. Missing keys keep their current value here;
    :func:`rebuild_adam_steps` sets every parameter's step from the loaded groups right after."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        current = self._get_main_param_and_optimizer_states(model_param)
        missing = {key: value for key, value in current.items() if key not in tensors}
        return original(self, model_param, {**tensors, **missing})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


# -- call-site workarounds --------------------------------------------------------------------


@workaround(trigger="a MegatronModule without tp_group (CLIPViTModel, the MimoModel root)",
            remove_when="every MegatronModule takes its TP group at construction")
def apply_branch_tp_group(model: torch.nn.Module, tp_group) -> list[str]:
    """Give every MegatronModule that lacks ``tp_group`` the branch's TP group; return the names.

    ``MegatronModule.sharded_state_dict`` falls back to ``parallel_state``'s TP group when a
    module has no ``tp_group`` attribute; ``CLIPViTModel`` and the ``MimoModel`` root are such
    modules. Without a global parallel_state that fallback raises.
    """
    from megatron.core.transformer.module import MegatronModule

    fixed = []
    for name, module in model.named_modules():
        if isinstance(module, MegatronModule) and not hasattr(module, "tp_group"):
            module.tp_group = tp_group
            fixed.append(name or type(module).__name__)
    return fixed


def _torch_adam(optimizer) -> torch.optim.Optimizer | None:
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) else None


@workaround(trigger="a state dict of a never-stepped torch Adam (no TE/apex)",
            remove_when="DistributedOptimizer initialises torch Adam's state before a load")
def ensure_adam_state(optimizer) -> None:
    """Give every parameter of a never-stepped torch Adam zero moments and its own step.

    DistributedOptimizer's torch fallback cannot build a state dict (or a load template) before
    the first step: it asserts exactly one step value and reads ``state['step']``. Zeros are
    what Adam would start from anyway. TE/apex optimizers build their state themselves.
    """
    inner = _torch_adam(optimizer)
    if inner is None:
        return
    for group in inner.param_groups:
        for param in group["params"]:
            if param not in inner.state or not inner.state[param]:
                inner.state[param] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}


@workaround(trigger="an optimizer load with torch's Adam (no TE/apex)",
            remove_when="DistributedOptimizer restores one step tensor per parameter")
def rebuild_adam_steps(optimizer) -> None:
    """Give every parameter its own ``step`` tensor, equal to its loaded param group's step.

    After a load the torch fallback assigns one shared tensor to every parameter (after one more
    step it reads N+P), and the dp_reshardable path copies the pre-load step back over it; both
    silently change Adam's bias correction. Only torch's Adam keeps a per-parameter step.
    """
    inner = _torch_adam(optimizer)
    if inner is None:
        return
    for group in inner.param_groups:
        if "step" not in group:
            continue
        for param in group["params"]:
            if param in inner.state:
                inner.state[param]["step"] = torch.tensor(float(group["step"]))


@workaround(trigger="loading a scheduler state into a scheduler object",
            remove_when="OptimizerParamScheduler.load_state_dict sets the step count")
def load_scheduler_state(scheduler, state: dict[str, Any]) -> None:
    """``OptimizerParamScheduler.load_state_dict`` *adds* the saved step count to the current one
    (``self.step(increment=num_steps)``): a scheduler that already stepped would be stepped
    twice. Start from zero so the loaded count is the count."""
    scheduler.num_steps = 0
    scheduler.load_state_dict(state)


class DeferredScalerUpdate:
    """A branch's grad scaler whose ``update`` waits for the world's found-inf verdict.

    Each branch's optimizer updates its loss scaler inside ``prepare_grads`` with the found-inf
    flag of *its own* gradients. With an overflow on the images ranks only, the images scaler
    backs off while the language scaler grows; the loss, scaled by the language scaler, then no
    longer matches the images scaler's unscaling. Here the branch's update is only recorded;
    :meth:`settle` applies the world-agreed flag, so every branch's scaler moves identically.
    """

    def __init__(self, scaler) -> None:
        self.scaler = scaler

    def update(self, found_inf: bool) -> None:
        """Defer: the world verdict comes through :meth:`settle`."""

    def settle(self, found_inf: bool) -> None:
        """Apply the world-agreed found-inf flag to the real scaler."""
        self.scaler.update(found_inf)

    def __getattr__(self, name: str) -> Any:  # scale, inv_scale, state_dict, load_state_dict
        return getattr(self.scaler, name)


@workaround(trigger="fp16 with an overflow in one branch's gradients only",
            remove_when="MimoOptimizer updates every branch's scaler on the world's found-inf")
def defer_scaler_updates(optimizers) -> list[DeferredScalerUpdate]:
    """Give every optimizer with a grad scaler (inside a ChainedOptimizer too) a
    :class:`DeferredScalerUpdate`; return them."""
    deferred = []
    for optimizer in (inner for outer in optimizers
                      for inner in getattr(outer, "chained_optimizers", [outer])):
        scaler = getattr(optimizer, "grad_scaler", None)
        if scaler is not None and not isinstance(scaler, DeferredScalerUpdate):
            optimizer.grad_scaler = DeferredScalerUpdate(scaler)
            deferred.append(optimizer.grad_scaler)
    return deferred


def settle_scaler_updates(local_found_inf: bool, deferred: list[DeferredScalerUpdate],
                          device: torch.device) -> bool:
    """World MAX of found-inf, applied to every deferred scaler; returns the world verdict.

    Every rank calls it once per step (one small all-reduce), with or without a scaler."""
    flag = torch.tensor([1.0 if local_found_inf else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    found_inf = flag.item() > 0
    for scaler in deferred:
        scaler.settle(found_inf)
    return found_inf


@workaround(trigger="an fp16 (grad scaler) optimizer saved 'dp_reshardable'",
            remove_when="MimoOptimizer stops wrapping the scaler's ShardedObject a second time")
def apply_unnested_grad_scaler(optimizer_sharded: dict[str, Any]) -> dict[str, Any]:
    """Unwrap the grad-scaler ShardedObject MimoOptimizer wraps around another ShardedObject.

    With 'dp_reshardable', DistributedOptimizer already turns every non-tensor entry (the grad
    scaler included) into a ShardedObject; MimoOptimizer then wraps the scaler once more, so a
    load hands ``grad_scaler.load_state_dict`` a ShardedObject instead of the scaler state
    (``TypeError: 'ShardedObject' object is not subscriptable``): no fp16 run could resume.
    The outer object (key ``mimo.<branch>...grad_scaler``, one main replica per branch) keeps the
    inner object's data: the scaler state itself.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if (str(key).startswith("_mimo_grad_scaler") and isinstance(value, ShardedObject)
                        and isinstance(value.data, ShardedObject)):
                    value.data = value.data.data
                else:
                    visit(value)
        elif isinstance(node, list | tuple):
            for value in node:
                visit(value)

    visit(optimizer_sharded)
    return optimizer_sharded


WRAPPER_LEVELS = re.compile(r"^(language_model\.|modality_submodules\.[^.]+\.)(?:module\.)+")
"""The ``module.`` segments MimoModel inserts after a branch's name, one per wrapper level."""


@workaround(trigger="a branch wrapped in DDP and/or Float16Module (always: keys must not "
                    "depend on it)",
            remove_when="MimoModel.sharded_state_dict keys no longer depend on the wrappers")
def apply_wrapper_free_keys(model_sharded: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` levels from every checkpoint key of a MimoModel sharded state dict.

    ``MimoModel.sharded_state_dict`` adds ``module.`` per wrapper (DDP, Float16Module), so the
    same weight is ``language_model.module.decoder...`` in fp32 and
    ``language_model.module.module.decoder...`` in bf16: a checkpoint would not load across
    precisions. With this, keys are ``language_model.decoder...`` whatever wraps the branch. Only
    the checkpoint keys change; the dict keys (for ``load_state_dict``) stay the module's own.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(model_sharded):
        key = getattr(value, "key", None)
        if isinstance(key, str):
            value.key = WRAPPER_LEVELS.sub(r"\1", key)
    return model_sharded

