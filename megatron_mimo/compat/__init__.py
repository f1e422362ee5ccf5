"""Every megatron-core workaround, named after its function, gated on its real trigger:
``cpu.py`` (CPU only), ``mcore.py`` (any device), ``checkpointing.py`` (torch_dist save and load,
any device), ``registry.py`` (how one is written down)."""

from __future__ import annotations

import logging

from megatron_mimo.compat import checkpointing as _checkpointing_workarounds  # noqa: F401
from megatron_mimo.compat import cpu as _cpu_workarounds  # noqa: F401 - fills the registry
from megatron_mimo.compat import mcore as _mcore_workarounds  # noqa: F401
from megatron_mimo.compat.registry import REGISTRY, Workaround, apply_all, unverified_warning

logger = logging.getLogger(__name__)

ALL_WORKAROUNDS: tuple[Workaround, ...] = tuple(REGISTRY.values())

_VERSION_CHECKED = False


def process_workarounds(cpu: bool) -> tuple[Workaround, ...]:
    """The process workarounds for a process on the CPU (``cpu``) or on a GPU."""
    return tuple(w for w in ALL_WORKAROUNDS if w.apply is not None and (cpu or not w.cpu))


def apply_process_workarounds(cpu: bool) -> list[str]:
    """Check the megatron-core version once, then apply the process workarounds whose trigger
    is present (the CPU ones only when ``cpu``); return the names applied now."""
    global _VERSION_CHECKED
    if not _VERSION_CHECKED:
        from megatron.core import __version__

        warning = unverified_warning(__version__, ALL_WORKAROUNDS)
        if warning:
            logger.warning(warning)
        _VERSION_CHECKED = True
    return apply_all(process_workarounds(cpu))
