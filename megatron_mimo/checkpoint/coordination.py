"""The checkpoint code's collectives: bounded in time, one-line errors, timed per phase.

Saves and loads agree through gloo groups of their own, created with the checkpoint timeout, so
a rank that never arrives becomes an error naming it instead of a hang. Two groups: the loop's
(saves and loads start there) and the writers' (an async save's writer thread finalises there
while the loop goes on; a collective of the thread must never share a group with the loop's).
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from megatron_mimo.errors import CheckpointError


@contextlib.contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the time spent in the block to ``seconds[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] += time.perf_counter() - start


class Group:
    """A gloo group over every rank whose collectives are bounded by ``timeout_s``; their time
    goes to ``seconds`` under ``prefix + 'barrier'`` and ``prefix + 'gather'``."""

    def __init__(self, timeout_s: float, seconds: dict[str, float], prefix: str = "") -> None:
        self.timeout_s = timeout_s
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.seconds, self.prefix = seconds, prefix
        self.pg = dist.new_group(backend="gloo", timeout=self.timeout)

    def barrier(self, what: str) -> None:
        """Every rank arrives, or a CheckpointError naming ``what`` (rank 0's names the ranks
        missing)."""
        try:
            with timed(self.seconds, self.prefix + "barrier"):
                dist.monitored_barrier(group=self.pg, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise CheckpointError(f"{what}: not every rank arrived within {self.timeout_s:g} s "
                                  f"({error})") from error

    def exchange(self, what: str, value: Any) -> list[Any]:
        """Every rank's ``value`` (a small Python object), in rank order."""
        self.barrier(what)
        values: list[Any] = [None] * dist.get_world_size()
        with timed(self.seconds, self.prefix + "gather"):
            dist.all_gather_object(values, value, group=self.pg)
        return values

    def destroy(self) -> None:
        dist.destroy_process_group(self.pg)
