"""Rank/branch-aware logging: every record carries ``[rank R branch]`` so interleaved output reads."""

from __future__ import annotations

import logging
import sys
import warnings

_FORMAT = "%(asctime)s [rank %(rank)s %(branch)s] %(levelname)s %(name)s: %(message)s"

NOISY_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "absl.logging is not installed",
)
"""Import-time warnings megatron-core prints on every process without TE/apex/absl."""


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, branch: str) -> None:
        super().__init__()
        self.rank, self.branch = rank, branch

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.branch = self.rank, self.branch
        return True


def silence_known_warnings() -> None:
    """Hide megatron-core's import-time warnings about optional GPU packages."""
    for text in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")


def setup_logging(rank: int, branch: str = "-", level: str = "INFO") -> None:
    """Route the root logger to stdout with a rank/branch prefix (call again to relabel)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, branch))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("megatron.core", "megatron"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
