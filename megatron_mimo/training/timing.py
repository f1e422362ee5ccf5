"""Time per named phase of a step, on the clock that sees the work.

On a CUDA device a phase is a pair of ``torch.cuda.Event`` s recorded on the current stream:
kernels are launched asynchronously, so the host clock would time their launch, the stream's
clock times their execution. On the CPU the work runs while the host waits, and
``time.perf_counter`` times it. Either way the marks are only recorded while the step runs and
turned into milliseconds once, by :meth:`PhaseTimer.read` (one device synchronisation).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch


class Mark(Protocol):
    """A point on a clock: ``torch.cuda.Event(enable_timing=True)`` or :class:`HostMark`."""

    def record(self) -> None: ...

    def elapsed_time(self, end: Mark) -> float: ...


class HostMark:
    """A ``time.perf_counter`` stamp with the part of the CUDA event interface the timer uses."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def record(self) -> None:
        self.seconds = time.perf_counter()

    def elapsed_time(self, end: HostMark) -> float:
        """Milliseconds from this mark to ``end`` (as ``torch.cuda.Event.elapsed_time``)."""
        return (end.seconds - self.seconds) * 1e3


@dataclass(frozen=True)
class Clock:
    """How to make a mark, and how to make every recorded mark readable."""

    mark: Callable[[], Mark]
    settle: Callable[[], None]


HOST_CLOCK = Clock(mark=HostMark, settle=lambda: None)


def device_clock(device: torch.device) -> Clock:
    """CUDA events (settled by one synchronisation of ``device``) on a CUDA device, else the
    host clock."""
    if device.type == "cuda":
        return Clock(mark=partial(torch.cuda.Event, enable_timing=True),
                     settle=partial(torch.cuda.synchronize, device))
    return HOST_CLOCK


@dataclass
class _Span:
    name: str
    start: Mark
    end: Mark
    excluded: list[_Span] = field(default_factory=list)
    """Spans timed inside this one whose time is not this span's (see ``remainder``)."""


class PhaseTimer:
    """Milliseconds per named phase of a step on this rank (for the step-time breakdown).

    A phase timed several times adds up; nested phases each count their own time, except that a
    :meth:`remainder` span gives away the time of the phases it names that ran inside it."""

    def __init__(self, clock: Clock = HOST_CLOCK) -> None:
        self.clock = clock
        self._spans: list[_Span] = []

    def reset(self) -> None:
        """Forget every recorded span (start of a step)."""
        self._spans = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        with self._span(name):
            yield

    @contextmanager
    def remainder(self, name: str, excluding: tuple[str, ...]) -> Iterator[None]:
        """Time the block as phase ``name``, minus the ``excluding`` phases timed inside it."""
        with self._span(name) as span:
            first = len(self._spans)
            try:
                yield
            finally:
                span.excluded = [inner for inner in self._spans[first:] if inner.name in excluding]

    @contextmanager
    def _span(self, name: str) -> Iterator[_Span]:
        span = _Span(name, self.clock.mark(), self.clock.mark())
        span.start.record()
        try:
            yield span
        finally:
            span.end.record()
            self._spans.append(span)

    def read(self) -> dict[str, float]:
        """Milliseconds per phase of the spans recorded since :meth:`reset` (settles the clock)."""
        self.clock.settle()
        ms: dict[str, float] = defaultdict(float)
        for span in self._spans:
            ms[span.name] += _ms(span) - sum(_ms(inner) for inner in span.excluded)
        return dict(ms)


def _ms(span: _Span) -> float:
    return span.start.elapsed_time(span.end)
