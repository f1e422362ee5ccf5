"""Seeding of every random stream a rank uses: python, numpy, torch (CPU/CUDA), megatron tracker."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core.tensor_parallel import random as mcore_random

from megatron_mimo.models.common import BRANCH_SEED_OFFSET

TRACKER_TP_OFFSET = 2718
"""megatron's offset of the tensor-parallel stream (``tensor_parallel/random.py``)."""
TRACKER_EXPERT_OFFSET = 1024


def tracker_stream_names() -> dict[str, str]:
    """megatron's RNG tracker stream names by role. They are private module constants; the
    layers fork these names, so seeding must add exactly them (a wrong name fails at the first
    dropout with "stream ... was never added")."""
    return {"data": mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME,
            "model": mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
            "expert": mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME}


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
