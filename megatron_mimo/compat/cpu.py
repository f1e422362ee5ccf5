"""CPU-only workarounds for megatron-core 0.19.2: every CUDA assumption we hit, in one place.

megatron-core assumes CUDA in places that run on every step (grad buffers, optimizer, bridge).
On a machine without a GPU each workaround below turns one class of assumption into its CPU
equivalent. Their trigger is the device: they are applied only when the process runs on the
CPU (never with a GPU), by :func:`megatron_mimo.compat.apply_process_workarounds`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_mimo.compat.registry import Workaround

ON_CPU = "the process runs on the CPU (no GPU, or MIMO_DEVICE=cpu)"


def _cpu(name: str, covers: tuple[str, ...], apply) -> Workaround:
    return Workaround(name, covers, ON_CPU, apply)


def _current_device_is_cpu() -> None:
    """``torch.cuda.current_device()`` is used as a device; on CPU it must name the CPU."""
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


class _NullStream:
    """Stands in for a CUDA stream: all ordering is already sequential on the CPU."""

    def wait_event(self, event: Any) -> None:
        """CPU work is synchronous; nothing to wait for."""

    def wait_stream(self, stream: Any) -> None:
        """CPU work is synchronous; nothing to wait for."""

    def synchronize(self) -> None:
        """CPU work is synchronous; nothing to wait for."""


def _cuda_streams_are_noops() -> None:
    """Streams and synchronize are ordering tools that are no-ops on the CPU."""
    null_stream = _NullStream()
    torch.cuda.current_stream = lambda device=None: null_stream  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class CudaLiteralsToCpu(TorchFunctionMode):
    """Rewrites the CUDA spellings megatron-core hard-codes into their CPU meaning.

    * a CUDA ``device`` keyword on factory calls -> the CPU;
    * ``Tensor.cuda`` calls -> the tensor itself;
    * ``Tensor.type()`` of a CPU float tensor -> ``torch.cuda.FloatTensor`` (the optimizer
      accepts only the CUDA type names as "fp32 parameter").
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(result, result)
        return result


_MODE: CudaLiteralsToCpu | None = None


def _cuda_literals_to_cpu() -> None:
    """Enter :class:`CudaLiteralsToCpu` for the rest of the process."""
    global _MODE
    _MODE = CudaLiteralsToCpu()
    _MODE.__enter__()


class _GlooBridgeDist:
    """``torch.distributed`` as seen by the bridge module, minus its hard-coded NCCL backend."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.distributed, name)

    @staticmethod
    def new_group(*args: Any, backend: str | None = None, **kwargs: Any):
        return torch.distributed.new_group(*args, **kwargs)

    @staticmethod
    def new_subgroups_by_enumeration(*args: Any, backend: str | None = None, **kwargs: Any):
        return torch.distributed.new_subgroups_by_enumeration(*args, **kwargs)


def _bridge_groups_use_default_backend() -> None:
    """The bridge creates its groups with the NCCL backend hard-coded; use the world's instead."""
    from megatron.core.pipeline_parallel import bridge_communicator

    bridge_communicator.dist = _GlooBridgeDist()  # type: ignore[assignment]


class CpuRNGStatesTracker:
    """megatron's RNG tracker with its named streams kept on the CPU generator.

    The stock tracker stores CUDA generator states; without CUDA, ``add`` fails and
    ``_set_cuda_rng_state`` silently queues the state forever (``tensor_parallel/random.py:174``),
    so a restore is a no-op. This keeps the same names and ``fork`` semantics on the CPU.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every stream."""
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        """Whether any stream was added or set."""
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copy of every named stream's generator state."""
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace every named stream's state."""
        self.states_ = {name: state.clone() for name, state in states.items()}
        self._is_initialized = True

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed``."""
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"rng stream {name!r} or seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()
        self._is_initialized = True

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        """Run the block on stream ``name``, then put the default generator back."""
        if name not in self.states_:
            raise KeyError(f"rng stream {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_rng_tracker() -> None:
    """Install :class:`CpuRNGStatesTracker` as megatron's global tracker."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _no_torch_compile() -> None:
    """megatron's ``jit_fuser`` is ``torch.compile``: ~30 s per first call on this CPU."""
    import torch._dynamo

    torch._dynamo.config.disable = True


CPU_WORKAROUNDS: tuple[Workaround, ...] = (
    _cpu("current_device_is_cpu", (
        "distributed/param_and_grad_buffer.py:1162,1180,1186",
        "pipeline_parallel/bridge_communicator.py:420,456,465,551,939,957",
        "transformer/dot_product_attention.py:123,132",
        "tensor_parallel/layers.py:305,647", "tensor_parallel/mappings.py:95,145,185",
        "models/mimo/model/base.py:580", "utils.py:715",
        "dist_checkpointing/strategies/state_dict_saver.py:252",
        "dist_checkpointing/strategies/async_utils.py:224",
        "pipeline_parallel/p2p_communication.py:211,215,219,223,334,342",
    ), _current_device_is_cpu),
    _cpu("cuda_streams_are_noops", (
        "distributed/param_and_grad_buffer.py:632,691,814",
        "dist_checkpointing/strategies/async_utils.py:273",
        "dist_checkpointing/strategies/filesystem_async.py:248",
        "dist_checkpointing/strategies/fully_parallel.py:287,296", "utils.py:1721",
        "pipeline_parallel/p2p_communication.py:263,419",
    ), _cuda_streams_are_noops),
    _cpu("cuda_literals_to_cpu", (
        "models/mimo/optimizer.py:65,82,107,135,139",
        "optimizer/clip_grads.py:96,108,112,174,180,231",
        "optimizer/optimizer.py:315,690,698,702,1028,1249",
        "optimizer/distrib_optimizer.py:466", "utils.py:1332",
        "models/vision/clip_vit_model.py:124",
        "dist_checkpointing/strategies/state_dict_saver.py:204",
        "pipeline_parallel/schedules.py:2292",
    ), _cuda_literals_to_cpu),
    _cpu("bridge_groups_use_default_backend", (
        "pipeline_parallel/bridge_communicator.py:199,209",
    ), _bridge_groups_use_default_backend),
    _cpu("cpu_rng_tracker", (
        "tensor_parallel/random.py:127,165,174,285,311",
        "transformer/dot_product_attention.py:217", "tensor_parallel/layers.py:177",
    ), _cpu_rng_tracker),
    _cpu("no_torch_compile", ("jit.py:21",), _no_torch_compile),
)
