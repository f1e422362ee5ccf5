"""CPU-only workarounds for megatron-core: every CUDA assumption on the training path, in one
place.

megatron-core assumes CUDA in places that run on every step (grad buffers, optimizer, bridge,
schedule, checkpoint writer). On a machine without a GPU each workaround below turns one class
of assumption into its CPU equivalent. Their trigger is the device: they are applied only when
the process runs on the CPU (never with a GPU), by
:func:`megatron_mimo.compat.apply_process_workarounds`. Each one is proven necessary by
``tests/distributed/test_workarounds_needed.py`` (the call fails without it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_mimo.compat.registry import workaround

ON_CPU = "the process runs on the CPU (no GPU, or MIMO_DEVICE=cpu)"
CPU_ONLY = "never: megatron-core is written for CUDA devices; this is how it runs on a CPU"


def cpu_workaround(**record: str):
    """A process workaround applied only on the CPU (see :func:`registry.workaround`)."""
    return workaround(trigger=ON_CPU, remove_when=record.pop("remove_when", CPU_ONLY),
                      process=True, cpu=True, **record)


@cpu_workaround()
def current_device_is_cpu() -> None:
    """``torch.cuda.current_device()`` is used as a device (grad buffers, bridge, attention,
    P2P, tensor-parallel layers, the checkpoint writer); on the CPU it must name the CPU."""
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


class _NullStream:
    """Stands in for a CUDA stream: all ordering is already sequential on the CPU."""

    def wait_event(self, event: Any) -> None:
        """CPU work is synchronous; nothing to wait for."""

    def wait_stream(self, stream: Any) -> None:
        """CPU work is synchronous; nothing to wait for."""

    def synchronize(self) -> None:
        """CPU work is synchronous; nothing to wait for."""


@cpu_workaround()
def cuda_streams_are_noops() -> None:
    """Streams and ``synchronize`` (every grad sync, P2P, the checkpoint writer) order GPU work;
    CPU work is already sequential, so they are no-ops."""
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


@cpu_workaround()
def cuda_literals_to_cpu() -> None:
    """Enter :class:`CudaLiteralsToCpu` for the rest of the process (``device="cuda"`` in the
    optimizer, grad clipping, MimoOptimizer, the schedule, CLIPViTModel, the save planner)."""
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


@cpu_workaround()
def bridge_groups_use_default_backend() -> None:
    """``BridgeCommunicator`` creates its groups with the NCCL backend hard-coded; use the
    world's backend instead."""
    from megatron.core.pipeline_parallel import bridge_communicator

    bridge_communicator.dist = _GlooBridgeDist()  # type: ignore[assignment]


class CpuRNGStatesTracker:
    """megatron's RNG tracker with its named streams kept on the CPU generator.

    The stock tracker stores CUDA generator states; without CUDA, ``add`` fails and
    ``_set_cuda_rng_state`` silently queues the state forever (``_lazy_call`` without CUDA),
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


@cpu_workaround()
def cpu_rng_tracker() -> None:
    """Install :class:`CpuRNGStatesTracker` as megatron's global tracker."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


@cpu_workaround(remove_when="megatron's jit_fuser stops compiling on the CPU")
def no_torch_compile() -> None:
    """megatron's ``jit_fuser`` is ``torch.compile``, which compiles each fused function on its
    first call; on a CPU that costs far more than the eager functions ever save."""
    import torch._dynamo

    torch._dynamo.config.disable = True
