"""The one place that chooses device and backend and owns the torch.distributed lifetime.

``cuda`` + ``nccl`` when a GPU is present, ``cpu`` + ``gloo`` otherwise (``MIMO_DEVICE=cpu``
forces the CPU on a GPU machine). The megatron-core workarounds of :mod:`megatron_mimo.compat`
whose trigger is present are applied here, once per process. Nothing here calls ``parallel_state.initialize_model_parallel``: process groups come
from :mod:`megatron_mimo.topology`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mimo.errors import ConfigError

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
        raise ConfigError(f"MIMO_DEVICE must be 'cpu' or 'cuda', got {choice!r}")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("MIMO_DEVICE=cuda but torch sees no GPU")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return Runtime(torch.device("cuda", local_rank), "nccl")
    return Runtime(torch.device("cpu"), "gloo")


def prepare_process(runtime: Runtime) -> None:
    """Per-process setup that must precede model building: the CUDA device, then every
    megatron-core workaround this process needs (CPU ones only on the CPU)."""
    from megatron_mimo.compat import apply_process_workarounds

    if not runtime.is_cpu:
        torch.cuda.set_device(runtime.device)
    apply_process_workarounds(cpu=runtime.is_cpu)


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
