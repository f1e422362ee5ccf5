"""How a megatron-core workaround is written down: name, the lines it covers, its real trigger.

Two kinds. *Process* workarounds patch megatron-core once per process, when their trigger is
present (``needed()``), from :func:`megatron_mimo.compat.apply_process_workarounds`. *Call-site*
workarounds are functions the package calls at the one place megatron-core would go wrong
(e.g. right after an optimizer load); they check their trigger themselves. Both are listed so
that a start on an unverified megatron-core version names every one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

VERIFIED_MCORE_VERSIONS = ("0.19.2",)
"""megatron-core versions whose source the workarounds were read against and tested on."""


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Workaround:
    """One named megatron-core workaround."""

    name: str
    covers: tuple[str, ...]
    """megatron-core ``file:line`` (relative to ``megatron/core``) it works around."""
    trigger: str
    """The condition under which megatron-core fails without it (why it exists)."""
    apply: Callable[[], None] | None = None
    """Process-wide patch; None for a call-site workaround."""
    needed: Callable[[], bool] = field(default=_always)
    """Whether the trigger is present in this process (process workarounds only)."""


_APPLIED: set[str] = set()


def apply_all(workarounds: Iterable[Workaround]) -> list[str]:
    """Apply every process workaround whose trigger is present and that is not applied yet."""
    applied_now = []
    for workaround in workarounds:
        if workaround.apply is None or workaround.name in _APPLIED or not workaround.needed():
            continue
        workaround.apply()
        _APPLIED.add(workaround.name)
        applied_now.append(workaround.name)
    if applied_now:
        logger.debug("applied megatron-core workarounds: %s", ", ".join(applied_now))
    return applied_now


def applied() -> frozenset[str]:
    """Names of the process workarounds applied in this process."""
    return frozenset(_APPLIED)


def unverified_warning(version: str, workarounds: Iterable[Workaround]) -> str | None:
    """The warning to log when ``version`` is not one the workarounds were written for (a local
    suffix such as ``+<git hash>``, which megatron-core adds when run inside a git checkout,
    does not count)."""
    if version.split("+")[0] in VERIFIED_MCORE_VERSIONS:
        return None
    names = ", ".join(sorted(w.name for w in workarounds))
    return (f"megatron-core {version} is not a version the workarounds were verified on "
            f"({', '.join(VERIFIED_MCORE_VERSIONS)}); unverified: {names}")
