"""Seeding of every random stream a rank uses: python, numpy, torch (CPU/CUDA), megatron tracker."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core.tensor_parallel import random as mcore_random

from megatron_mimo.compat.mcore import tracker_stream_names
from megatron_mimo.models.common import BRANCH_SEED_OFFSET

TRACKER_TP_OFFSET = 2718
"""megatron's offset of the tensor-parallel stream (``tensor_parallel/random.py``)."""
TRACKER_EXPERT_OFFSET = 1024


def seed_rank(seed: int, branch: str, tp_rank: int) -> None:
    """Seed this rank's streams. Same seed across a branch's DP replicas for the default
    stream; the tracker's model-parallel stream differs per TP rank (dropout in TP regions)."""
    branch_seed = seed + BRANCH_SEED_OFFSET[branch]
    random.seed(branch_seed)
    np.random.seed(branch_seed % 2**32)
    torch.manual_seed(branch_seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(branch_seed)
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    names = tracker_stream_names()
    tracker.add(names["data"], branch_seed)
    tracker.add(names["model"], branch_seed + TRACKER_TP_OFFSET + tp_rank)
    tracker.add(names["expert"], branch_seed + TRACKER_EXPERT_OFFSET + tp_rank)
