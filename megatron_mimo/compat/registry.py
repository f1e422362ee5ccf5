"""How a megatron-core workaround is written down: ``@workaround`` on the function that is it.

The record lives on the function (``fn.workaround``) and in one registry keyed by the function's
name, so the name in logs, docs and tests is the name in the code. Two kinds:

* *process* workarounds (``process=True``) patch megatron-core once per process, from
  :func:`megatron_mimo.compat.apply_process_workarounds`, when their trigger is present
  (``needed()``; ``cpu=True`` ones only when the process runs on the CPU);
* *call-site* workarounds are called by the package at the one place megatron-core would go
  wrong (e.g. right after an optimizer load) and check their trigger themselves.

No record names megatron-core lines: they move with every release. What keeps the records
honest is the version check (a start on a megatron-core version the workarounds were not
verified on names every one of them) and the proof tests (each workaround's call fails without
it on the verified version).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

VERIFIED_MCORE_VERSIONS = ("0.19.2",)
"""megatron-core versions whose source the workarounds were read against and tested on."""

NOT_REPORTED = "not reported"
"""``upstream`` of a workaround whose megatron-core defect has no public issue or PR yet."""


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Workaround:
    """One named megatron-core workaround (its function carries it as ``fn.workaround``)."""

    name: str
    """The decorated function's name."""
    trigger: str
    """The condition under which megatron-core fails without it (why it exists)."""
    upstream: str
    """Link to the upstream issue or PR, or :data:`NOT_REPORTED`."""
    remove_when: str
    """What upstream change makes it unnecessary (check at every megatron-core upgrade)."""
    apply: Callable[[], None] | None = None
    """Process-wide patch; None for a call-site workaround."""
    needed: Callable[[], bool] = field(default=_always)
    """Whether the trigger is present in this process (process workarounds only)."""
    cpu: bool = False
    """Applied only when the process runs on the CPU."""


REGISTRY: dict[str, Workaround] = {}
"""Every workaround of the package by name, in definition order (filled at import)."""

F = TypeVar("F", bound=Callable[..., Any])


def workaround(*, trigger: str, remove_when: str, upstream: str = NOT_REPORTED,
               process: bool = False, needed: Callable[[], bool] = _always,
               cpu: bool = False) -> Callable[[F], F]:
    """Register the decorated function as a workaround under its own name."""

    def register(fn: F) -> F:
        name = fn.__name__
        if name in REGISTRY:
            raise ValueError(f"workaround {name!r} is registered twice")
        record = Workaround(name, trigger, upstream, remove_when, fn if process else None,
                            needed, cpu)
        REGISTRY[name] = record
        fn.workaround = record  # type: ignore[attr-defined]
        return fn

    return register


_APPLIED: set[str] = set()


def apply_all(workarounds: Iterable[Workaround]) -> list[str]:
    """Apply every process workaround whose trigger is present and that is not applied yet."""
    applied_now = []
    for record in workarounds:
        if record.apply is None or record.name in _APPLIED or not record.needed():
            continue
        record.apply()
        _APPLIED.add(record.name)
        applied_now.append(record.name)
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
