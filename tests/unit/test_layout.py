"""Pure rank arithmetic of layouts."""

import pytest

from megatron_mimo.config.layout import (
    branch_of,
    branch_spec,
    check_batch_split,
    check_layout,
)
from megatron_mimo.errors import ConfigError

IMAGES = branch_spec("images", tp=1, dp=2, offset=0)
LANGUAGE = branch_spec("language", tp=2, dp=1, offset=2)


def test_exact_tiling_passes():
    check_layout([IMAGES, LANGUAGE], 4)
    check_layout([LANGUAGE, IMAGES], 4)  # order of specs does not matter


@pytest.mark.parametrize("specs, world, message", [
    ([IMAGES, LANGUAGE], 5, "ranks 4-4 belong to no branch; the branches cover 4 of 5"),
    ([IMAGES, LANGUAGE], 3, "language branch needs tp 2 x dp 1 x pp 1 = 2 ranks from rank 2 .* world has 3"),
    ([IMAGES, branch_spec("language", tp=2, offset=1)], 4, "branches overlap"),
    ([IMAGES, branch_spec("images", tp=2, offset=2)], 4, "names must be unique"),
    ([], 4, "at least one branch"),
])
def test_bad_layouts(specs, world, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(specs, world)


def test_branch_spec_rejects_non_positive():
    with pytest.raises(ConfigError, match="parallelism.tp must be >= 1, got 0"):
        branch_spec("images", tp=0)


def test_batch_split():
    check_batch_split([IMAGES, LANGUAGE], global_batch_size=8, job_micro_batch=2)
    with pytest.raises(ConfigError, match="does not split over the images branch's dp 2"):
        check_batch_split([IMAGES, LANGUAGE], global_batch_size=9, job_micro_batch=3)
    with pytest.raises(ConfigError, match="--global-batch-size 6 must divide by the job-wide micro-batch 4"):
        check_batch_split([IMAGES, LANGUAGE], global_batch_size=6, job_micro_batch=4)


def test_branch_of_finds_the_owner():
    assert branch_of([IMAGES, LANGUAGE], 3) is LANGUAGE
    assert branch_of([IMAGES, LANGUAGE], 0) is IMAGES
    with pytest.raises(ConfigError, match="belongs to no branch"):
        branch_of([IMAGES, LANGUAGE], 4)
