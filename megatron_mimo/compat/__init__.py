"""Every megatron-core workaround, named, gated on its real trigger, with the lines it covers:
``cpu.py`` (CPU only), ``mcore.py`` (any device), ``registry.py`` (how one is written down)."""

from __future__ import annotations

import logging

from megatron_mimo.compat.cpu import CPU_WORKAROUNDS
from megatron_mimo.compat.mcore import MCORE_WORKAROUNDS
from megatron_mimo.compat.registry import Workaround, apply_all, unverified_warning

logger = logging.getLogger(__name__)

ALL_WORKAROUNDS: tuple[Workaround, ...] = CPU_WORKAROUNDS + MCORE_WORKAROUNDS

_VERSION_CHECKED = False


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
    return apply_all((CPU_WORKAROUNDS if cpu else ()) + MCORE_WORKAROUNDS)
