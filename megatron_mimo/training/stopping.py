"""Clean early stops: SIGTERM/SIGUSR1 (e.g. Slurm preemption) and a wall-clock budget.

A signal only sets a flag; at the end of every iteration the world agrees (all-reduce MAX) on
whether anyone wants to stop, so every rank stops after the *same* iteration, saves the same
checkpoint and exits with :data:`EXIT_STOPPED_EARLY`. Further signals while stopping are
logged and ignored: the save is atomic either way.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_STOPPED_EARLY = 75
"""Process exit code after a signal or --exit-duration-in-mins stop (checkpoint saved when
--save is set): the job is not finished and should be resumed (EX_TEMPFAIL)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StopRequests:
    """Collects local reasons to stop; :meth:`agreed` turns them into a world decision."""

    exit_duration_s: float | None = None
    start: float = field(default_factory=time.monotonic)
    signal_name: str | None = None
    _previous: dict = field(default_factory=dict, repr=False)

    def install(self) -> StopRequests:
        """Catch the stop signals in this process (main thread only)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            logger.warning("received %s: stopping after this iteration and saving", name)
        else:
            logger.warning("received %s again while stopping: ignored (the save is atomic)", name)

    def local_reason(self) -> str | None:
        """Why this rank wants to stop, if it does."""
        if self.signal_name is not None:
            return f"signal {self.signal_name}"
        if self.exit_duration_s is not None and time.monotonic() - self.start >= self.exit_duration_s:
            return f"--exit-duration-in-mins {self.exit_duration_s / 60:g} reached"
        return None

    def agreed(self, device: torch.device) -> bool:
        """World-wide: does any rank want to stop? (one small all-reduce; same on every rank)"""
        flag = torch.tensor([1.0 if self.local_reason() else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0
