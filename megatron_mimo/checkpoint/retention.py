"""Retention: keep the newest K published checkpoints (``--ckpt-keep-last K``).

Runs right after a checkpoint is published and the tracker rewritten, so a deletion never races
the checkpoint a restart would load. A checkpoint is first renamed out of the ``iter_*``
namespace (atomic) and only then deleted: a crash in the middle leaves a ``.tmp_*`` directory,
removed at the next start, and every remaining ``iter_*`` directory complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from megatron_mimo import failpoints
from megatron_mimo.checkpoint import storage

logger = logging.getLogger(__name__)


def to_delete(iterations: list[int], keep_last: int, protected: int | None) -> list[int]:
    """The published iterations beyond the newest ``keep_last``, never ``protected`` (the one
    the tracker names)."""
    keep = set(sorted(iterations)[-keep_last:]) | {protected}
    return [it for it in sorted(iterations) if it not in keep]


def prune(root: str | Path, keep_last: int) -> list[int]:
    """Delete the checkpoints beyond the newest ``keep_last``; return their iterations."""
    root = Path(root)
    victims = to_delete(storage.published_iterations(root), keep_last, storage.read_tracker(root))
    for iteration in victims:
        final = storage.checkpoint_dir(root, iteration)
        doomed = root / (storage.TMP_PREFIX + "deleting_" + final.name)
        os.replace(final, doomed)
        failpoints.hit("checkpoint.prune_moved_aside", iteration=iteration)
        shutil.rmtree(doomed)
    if victims:
        logger.info("deleted checkpoints of iterations %s (--ckpt-keep-last %d)", victims, keep_last)
    return victims
