"""Rank-aware logging, quiet by default: every record carries ``[rank R branch]``; known
third-party noise (megatron-core's fallback notices, torch deprecations) is hidden unless
``--log-level DEBUG``, so what a user should act on stands out."""

from __future__ import annotations

import logging
import re
import sys
import warnings

_FORMAT = "%(asctime)s [rank %(rank)s %(branch)s] %(levelname)s %(name)s: %(message)s"

KNOWN_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "absl.logging is not installed",
    "Apex is not installed. Falling back to Torch Norm",
    "is experimental and still under active development",
    "full scope is deprecated",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    r"`torch\.distributed\.\w+` is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    "'pin_memory' argument is set as true but no accelerator is found",
    "c10d::broadcast_: an autograd kernel was not registered",
)
"""Python warnings megatron-core and torch print on every process of a CPU run (no TE/apex,
experimental MIMO API, deprecated collective names, a non-leaf ``.grad`` read inside
megatron-core, Energon's hard-coded ``pin_memory=True`` on a CPU, and the bridge's in-place
broadcast of a received activation that megatron-core's pipeline schedule backprops through: its
gradient travels back over the bridge, and language-PP runs match the single-rank reference);
none asks the user to do anything."""

KNOWN_RECORDS = (
    "full_param_layout not provided",
    "srcLeader=",
    "MCore's async save is deprecated",
    "common state dict differs from rank 0",
    "Local worker \\d+ encountered an error",
    "An error is caught while starting worker",
)
"""Third-party log records of the same kind (DDP's layout notice, the bridge's leader table, the
async-save deprecation notice every torch_dist save logs, the per-branch optimizer keys of the
common state that megatron-core's first-save validation lists, and the checkpoint writer's raw
failure lines, which the save reports as one CheckpointError naming the directory)."""

QUIET_LOGGERS = ("torch.utils.cpp_extension",)
"""Loggers that warn at import on a machine without CUDA ("No CUDA runtime is found")."""


def _debug(level: str | int) -> bool:
    return logging.getLevelName(level) == logging.DEBUG if isinstance(level, str) else level <= logging.DEBUG


def quiet_third_party(level: str | int = "INFO") -> None:
    """Hide the known third-party warnings (call before importing torch/megatron); with
    ``DEBUG`` everything stays visible."""
    if _debug(level):
        return
    for text in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _RankFilter(logging.Filter):
    """Labels every record with rank and branch; drops third-party chatter unless DEBUG."""

    def __init__(self, rank: int, branch: str, verbose: bool) -> None:
        super().__init__()
        self.rank, self.branch, self.verbose = rank, branch, verbose
        self.known = re.compile("|".join(KNOWN_RECORDS))

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.branch = self.rank, self.branch
        if self.verbose or record.name.startswith("megatron_mimo"):
            return True
        return record.levelno >= logging.WARNING and not self.known.search(record.getMessage())


def setup_logging(rank: int, branch: str = "-", level: str = "INFO") -> None:
    """Route the root logger to stdout with a rank/branch prefix (call again to relabel)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, branch, _debug(level)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_third_party(level)
