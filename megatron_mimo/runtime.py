"""The one place that chooses device and backend and owns the torch.distributed lifetime.

``cuda`` + ``nccl`` when a GPU is present, ``cpu`` + ``gloo`` otherwise (``MIMO_DEVICE=cpu``
forces the CPU on a GPU machine). On the CPU the shims of :mod:`megatron_mimo.cpu_shims` are
applied. Nothing here calls ``parallel_state.initialize_model_parallel``: process groups come
from :mod:`megatron_mimo.topology`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Runtime:
    """Device and collective backend of this process."""

    device: torch.device
    backend: str

    @property
    def is_cpu(self) -> bool:
        """True when running without a GPU (gloo + CPU shims)."""
        return self.device.type == "cpu"


def select_runtime(force: str | None = None) -> Runtime:
    """Pick ``cuda``/``nccl`` if a GPU is usable, else ``cpu``/``gloo``.

    ``force`` (or env ``MIMO_DEVICE``) may be ``"cpu"`` or ``"cuda"``.
    """
    choice = force or os.environ.get("MIMO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"MIMO_DEVICE must be 'cpu' or 'cuda', got {choice!r}")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("MIMO_DEVICE=cuda but torch sees no GPU")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return Runtime(torch.device("cuda", local_rank), "nccl")
    return Runtime(torch.device("cpu"), "gloo")


def prepare_process(runtime: Runtime) -> None:
    """Per-process setup that must precede model building: CUDA device or CPU shims.

    Also creates megatron-core's global memory buffer, which attention reads
    (``transformer/dot_product_attention.py:189``) and which otherwise only
    ``initialize_model_parallel`` makes; it creates no process group.
    """
    from megatron.core import parallel_state

    if runtime.is_cpu:
        from megatron_mimo.cpu_shims import apply_cpu_shims

        apply_cpu_shims()
    else:
        torch.cuda.set_device(runtime.device)
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()


def init_distributed(runtime: Runtime | None = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Runtime:
    """Initialise the default process group from torchrun's env (RANK, WORLD_SIZE, MASTER_*).

    Returns the runtime used. Safe to call when the group already exists.
    """
    runtime = runtime or select_runtime()
    prepare_process(runtime)
    if not dist.is_initialized():
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"{name} is not set: launch with torchrun (see README)")
        dist.init_process_group(backend=runtime.backend, timeout=timeout,
                                device_id=runtime.device if not runtime.is_cpu else None)
    logger.debug("rank %d/%d on %s (%s)", dist.get_rank(), dist.get_world_size(),
                 runtime.device, runtime.backend)
    return runtime


def destroy_distributed() -> None:
    """Tear down every process group of this process (idempotent)."""
    if dist.is_initialized():
        from megatron.core.pipeline_parallel.bridge_communicator import BridgeCommunicator

        BridgeCommunicator.destroy_broadcast_pgs()
        BridgeCommunicator.destroy_bridge_pgs()
        dist.destroy_process_group()


def model_parallel_state_is_untouched() -> bool:
    """True while megatron's global ``parallel_state`` model-parallel groups were never created."""
    from megatron.core import parallel_state

    return (parallel_state._TENSOR_MODEL_PARALLEL_GROUP is None
            and parallel_state._PIPELINE_MODEL_PARALLEL_GROUP is None
            and parallel_state._DATA_PARALLEL_GROUP is None
            and parallel_state._MODEL_PARALLEL_GROUP is None
            and not parallel_state.model_parallel_is_initialized())
