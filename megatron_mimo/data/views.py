"""Which Energon readers ("views") each rank runs so both branches see the same samples.

A job micro-step consumes ``J = micro_batch_size x language DP`` samples. The bridge concatenates
the images DP slices in DP order and splits the result over the language DP ranks in order, so
position ``p`` of a micro-step belongs to images DP rank ``p // (J / E)`` and to language DP
rank ``p // (J / L)`` (``E``, ``L`` = the branches' DP sizes).

Both branches therefore read the same ``V = lcm(E, L)`` views, each ``J / V`` samples per
micro-step, and DP rank ``r`` of a branch with DP size ``B`` runs views
``[r V / B, (r + 1) V / B)`` and concatenates their batches in view order. View ``v`` is Energon's
``WorkerConfig(rank=v, world_size=V)``: derived from the branch's own DP rank and size, never from
a global rank; each sample is read once per branch DP replica, and micro-step ``m`` of every view
is the same on both sides. TP ranks of a DP rank run the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_mimo.errors import DataError


@dataclass(frozen=True)
class ViewAssignment:
    """The views of one DP rank of one branch."""

    num_views: int
    views: tuple[int, ...]
    batch_size: int
    """Samples each view yields per micro-step."""


def assign_views(job_micro_batch: int, images_dp: int, language_dp: int, dp_size: int,
                 dp_rank: int) -> ViewAssignment:
    """Views of DP rank ``dp_rank`` of a branch with DP size ``dp_size`` (one of the two)."""
    num_views = math.lcm(images_dp, language_dp)
    if dp_size not in (images_dp, language_dp) or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp rank {dp_rank} of {dp_size} is not a rank of a branch with DP "
                        f"{images_dp} (images) or {language_dp} (language)")
    if job_micro_batch % num_views:
        raise DataError(f"a micro-step of {job_micro_batch} samples does not split over "
                        f"{num_views} readers (lcm of images DP {images_dp} and language DP "
                        f"{language_dp}): change --micro-batch-size")
    per_rank = num_views // dp_size
    views = tuple(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    return ViewAssignment(num_views, views, job_micro_batch // num_views)
