"""Named failpoints: places in the code where a test can make a process crash, stall or raise.

A failpoint is declared once in :data:`FAILPOINTS` and marked in the code with
``failpoints.hit("name", rank=..., iteration=...)``. It does nothing unless the one environment
variable :data:`ENV` enables it (read once per process, on the first hit)::

    MIMO_FAILPOINTS="checkpoint.before_publish=exit(17)@rank1:iter2;checkpoint.writer_start=sleep(60)@iter2"

Grammar: entries separated by ``;``, each ``NAME=ACTION[@FILTER]``.
ACTION is ``exit(CODE)`` (``os._exit``: no cleanup, like a killed rank), ``sleep(SECONDS)`` or
``raise`` (:class:`FailpointHit`). FILTER is terms joined by ``:``, each ``rankR`` or ``iterN``;
every term must equal what the call site passes, no filter fires on every hit.

An unknown name, a bad action, a filter on a value the failpoint is not hit with, or a name
given twice is a one-line :class:`~megatron_mimo.errors.ConfigError`: a typo must fail the test
that relies on the failure, never let it pass with nothing injected. With the variable unset a
hit costs one dict lookup. Leaf module (it imports only :mod:`megatron_mimo.errors`), so any
layer may mark a failpoint.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

from megatron_mimo.errors import ConfigError

logger = logging.getLogger(__name__)

ENV = "MIMO_FAILPOINTS"


@dataclass(frozen=True)
class Failpoint:
    """One place a failure can be injected: what it drives and the values it is hit with."""

    description: str
    keys: tuple[str, ...]


FAILPOINTS: dict[str, Failpoint] = {
    "checkpoint.before_publish": Failpoint(
        "a rank's shards of the checkpoint are written, it is not published yet: a rank dying "
        "here must leave the tracker on the previous checkpoint (mode 9)", ("rank", "iteration")),
    "checkpoint.write_in_flight": Failpoint(
        "an async save's writer was just started, the training rank goes on: a rank dying here "
        "must take its writer with it and publish nothing (mode 15)", ("rank", "iteration")),
    "checkpoint.stage_start": Failpoint(
        "in the async writer thread, before it copies the tensors: the training must not "
        "update them until the copy is taken (mode 15)", ("rank", "iteration")),
    "checkpoint.writer_start": Failpoint(
        "in the async writer thread, after the copy, before it writes: a stalled writer keeps "
        "the save in flight for as long as a test needs (mode 15)", ("rank", "iteration")),
    "checkpoint.prune_moved_aside": Failpoint(
        "retention renamed an old checkpoint to .tmp_deleting_*, not deleted yet: a crash here "
        "must leave every remaining iter_* complete (mode 16)", ("iteration",)),
}
"""Every failpoint, by name; ``keys`` are the values each hit passes (and a filter may test)."""

FILTER_TERMS = {"rank": "rank", "iter": "iteration"}
"""Filter term prefix -> the hit's keyword it is compared with."""


class FailpointHit(RuntimeError):
    """Raised by a failpoint enabled with the ``raise`` action."""


@dataclass(frozen=True)
class Rule:
    """What an enabled failpoint does, and when (``when``: key -> value the hit must pass)."""

    action: str
    argument: float | int | None
    when: tuple[tuple[str, int], ...] = ()

    def matches(self, context: dict[str, int]) -> bool:
        return all(context.get(key) == value for key, value in self.when)


ACTION = re.compile(r"(?P<verb>exit|sleep)\((?P<arg>[^()]*)\)|(?P<bare>raise)")
TERM = re.compile(r"(?P<prefix>rank|iter)(?P<value>\d+)")


def parse(text: str) -> dict[str, Rule]:
    """The rules of a :data:`ENV` value, by failpoint name; ConfigError on anything unknown."""
    rules: dict[str, Rule] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, equals, spec = (part.strip() for part in entry.partition("="))
        if name not in FAILPOINTS:
            raise ConfigError(f"{ENV}: unknown failpoint {name!r} in {entry!r} "
                              f"(known: {', '.join(sorted(FAILPOINTS))})")
        if not equals:
            raise ConfigError(f"{ENV}: failpoint {name!r} has no action ({name}=ACTION)")
        if name in rules:
            raise ConfigError(f"{ENV}: failpoint {name!r} is given twice")
        rules[name] = _rule(name, spec)
    return rules


def _rule(name: str, spec: str) -> Rule:
    action_text, _, filter_text = spec.partition("@")
    action = ACTION.fullmatch(action_text.strip())
    if action is None:
        raise ConfigError(f"{ENV}: bad action {action_text!r} for failpoint {name!r} "
                          "(exit(CODE), sleep(SECONDS) or raise)")
    verb = action["verb"] or action["bare"]
    try:
        argument = {"exit": int, "sleep": float}[verb](action["arg"]) if action["verb"] else None
    except ValueError:
        raise ConfigError(f"{ENV}: bad action {action_text!r} for failpoint {name!r}: "
                          f"{action['arg']!r} is not a number") from None
    return Rule(verb, argument, _filter(name, filter_text) if filter_text else ())


def _filter(name: str, text: str) -> tuple[tuple[str, int], ...]:
    when = []
    for term in text.split(":"):
        found = TERM.fullmatch(term.strip())
        if found is None:
            raise ConfigError(f"{ENV}: bad filter term {term!r} for failpoint {name!r} "
                              "(rankR or iterN, joined by ':')")
        key = FILTER_TERMS[found["prefix"]]
        if key not in FAILPOINTS[name].keys:
            raise ConfigError(f"{ENV}: failpoint {name!r} is not hit with a {key}, so "
                              f"{term!r} could never match")
        when.append((key, int(found["value"])))
    return tuple(when)


_rules: dict[str, Rule] | None = None
"""The parsed :data:`ENV` of this process (None until the first hit; forked children inherit)."""


def active() -> dict[str, Rule]:
    """The enabled failpoints of this process (parsed from :data:`ENV` once, then cached)."""
    global _rules
    if _rules is None:
        _rules = parse(os.environ.get(ENV, ""))
    return _rules


def reset() -> None:
    """Forget the cached rules: the next hit reads :data:`ENV` again (for tests)."""
    global _rules
    _rules = None


def hit(name: str, **context: int) -> None:
    """Mark failpoint ``name``; if enabled and its filter matches ``context``, take its action."""
    rule = (_rules if _rules is not None else active()).get(name)
    if rule is not None:
        _fire(name, rule, context)


def _fire(name: str, rule: Rule, context: dict[str, int]) -> None:
    if tuple(sorted(context)) != tuple(sorted(FAILPOINTS[name].keys)):
        raise TypeError(f"failpoint {name!r} is hit with {sorted(context)}, declared with "
                        f"{sorted(FAILPOINTS[name].keys)}")
    if not rule.matches(context):
        return
    where = ", ".join(f"{key} {context[key]}" for key in FAILPOINTS[name].keys)
    if rule.action == "raise":
        raise FailpointHit(f"failpoint {name} ({where})")
    if rule.action == "sleep":
        logger.warning("failpoint %s (%s): sleeping %s s", name, where, rule.argument)
        time.sleep(rule.argument)
        return
    logger.error("failpoint %s (%s): exiting with code %d", name, where, rule.argument)
    os._exit(rule.argument)
