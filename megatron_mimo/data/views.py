"""Which Energon readers ("views") each rank runs so every branch sees the same samples.

A job micro-step consumes ``J = micro_batch_size x language DP`` samples. The bridge concatenates
each encoder's DP slices in DP order and splits the result over the language DP ranks in order,
so position ``p`` of a micro-step belongs to DP rank ``p // (J / B)`` of every branch whose DP
size is ``B`` (images ``E``, audio ``A`` with an audio branch, language ``L``).

All branches therefore read the same ``V = lcm(E, [A,] L)`` views, each ``J / V`` samples per
micro-step, and DP rank ``r`` of a branch with DP size ``B`` runs views
``[r V / B, (r + 1) V / B)`` and concatenates their batches in view order. View ``v`` is Energon's
``WorkerConfig(rank=v, world_size=V)``: derived from the branch's own DP rank and size, never from
a global rank; each sample is read once per branch DP replica, and micro-step ``m`` of every view
is the same on every side. TP ranks of a DP rank run the same views. With two branches ``V`` is
``lcm(E, L)``, as it was before the audio branch: saved loader states stay valid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
    """Views of DP rank ``dp_rank`` of a branch with DP size ``dp_size`` of a two-branch job
    (images and language); :func:`assign_branch_views` for any set of branches."""
    return assign_branch_views(job_micro_batch, {"images": images_dp, "language": language_dp},
                               dp_size, dp_rank)


def _listed(items: list[str], last: str) -> str:
    """``a``, ``a and b``, ``a, b and c`` (``last``: 'and' or 'or')."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def assign_branch_views(job_micro_batch: int, branch_dps: Mapping[str, int], dp_size: int,
                        dp_rank: int) -> ViewAssignment:
    """Views of DP rank ``dp_rank`` of a branch with DP size ``dp_size``, in a job whose
    branches have the DP sizes ``branch_dps`` (by name, in the job's branch order)."""
    num_views = math.lcm(*branch_dps.values())
    if dp_size not in branch_dps.values() or not 0 <= dp_rank < dp_size:
        sizes = _listed([f"{dp} ({name})" for name, dp in branch_dps.items()], "or")
        raise DataError(f"dp rank {dp_rank} of {dp_size} is not a rank of a branch with DP "
                        f"{sizes}")
    if job_micro_batch % num_views:
        sizes = _listed([f"{name} DP {dp}" for name, dp in branch_dps.items()], "and")
        raise DataError(f"a micro-step of {job_micro_batch} samples does not split over "
                        f"{num_views} readers (lcm of {sizes}): change --micro-batch-size")
    per_rank = num_views // dp_size
    views = tuple(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    return ViewAssignment(num_views, views, job_micro_batch // num_views)
