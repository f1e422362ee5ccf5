"""A real 4-rank gloo world builds two branches and talks inside each branch's TP and DP groups."""

import pytest

from tests.harness import run_world

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def results():
    return run_world("tests.workers.topology_world", world_size=4, timeout=180)


def test_first_layout_groups_and_all_reduce(results):
    r = [res.layouts["images_tp1dp2_language_tp2dp1"] for res in results]
    assert [x.branch for x in r] == ["images", "images", "language", "language"]
    # images TP1xDP2: DP group {0,1} sums (1+2); TP groups are singletons.
    assert [x.dp.ranks for x in r[:2]] == [[0, 1], [0, 1]]
    assert [x.dp.sum for x in r[:2]] == [3.0, 3.0]
    assert [x.tp.sum for x in r[:2]] == [1.0, 2.0]
    # language TP2xDP1: TP group {2,3} sums (3+4); DP groups are singletons.
    assert [x.tp.ranks for x in r[2:]] == [[2, 3], [2, 3]]
    assert [x.tp.sum for x in r[2:]] == [7.0, 7.0]
    assert [x.dp.sum for x in r[2:]] == [3.0, 4.0]
    assert [x.dp_rank for x in r] == [0, 1, 0, 0]
    assert [x.tp_rank for x in r] == [0, 0, 0, 1]
    assert [x.intra_dist_opt for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_second_layout_after_rebuild(results):
    r = [res.layouts["images_tp2dp1_language_tp1dp2"] for res in results]
    assert [x.tp.ranks for x in r[:2]] == [[0, 1], [0, 1]]
    assert [x.tp.sum for x in r[:2]] == [3.0, 3.0]
    assert [x.dp.ranks for x in r[2:]] == [[2, 3], [2, 3]]
    assert [x.dp.sum for x in r[2:]] == [7.0, 7.0]
    assert [x.dp_rank for x in r] == [0, 0, 0, 1]
    assert all(x.pp_size == 1 for x in r)
    assert [x.mp_size for x in r] == [2, 2, 1, 1]


def test_parallel_state_never_initialised(results):
    assert all(res.parallel_state_untouched for res in results)
