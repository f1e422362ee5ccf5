"""Checkpoint structure and failure handling: uneven shards, constant structure with optional
state, mismatched or missing ranks, a rank killed in the middle of a save."""

import pytest

from tests.harness import run_world

pytestmark = pytest.mark.dist

WORKER = "tests.workers.ckpt_world"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    return run_world(WORKER, 4, {"mode": "features", "root": str(root)}, timeout=300)


def test_uneven_dp3_optimizer_shards_save_and_load(features):  # mode 3
    images_shards = [size for branch, size in features[0]["shards"] if branch == "images"]
    assert len(images_shards) == 3 and len(set(images_shards)) > 1, images_shards
    for rank in features:
        assert rank["reloaded"]["iteration"] == 2
        assert rank["reloaded"]["eval"] == rank["eval_at_save"]


def test_structure_is_constant_when_optional_state_appears(features):  # mode 2
    for rank in features:
        first, second = rank["fingerprints"]
        assert first == second
        # the second save used the cached plan and still kept the (now non-empty) skip history
        assert rank["reloaded"]["skipped_at"] == [2]


def test_ranks_saving_different_iterations_fail_together(features):  # mode 3
    for rank in features:
        error = rank["mismatch"]["error"]
        assert error and "CheckpointError" in error and "ranks disagree" in error


def test_missing_rank_becomes_a_bounded_error_naming_it(features):  # mode 3
    survivors = [r["missing"] for r in features if not r["missing"].get("skipped")]
    assert len(survivors) == 3
    for outcome in survivors:
        assert outcome["error"] and "CheckpointError" in outcome["error"]
        assert "not every rank arrived within 5 s" in outcome["error"]  # --ckpt-timeout-s 5
    assert "3" in survivors[0]["error"]  # rank 0 reports which rank never arrived


def test_rank_killed_during_save_leaves_previous_checkpoint_loadable(tmp_path):  # mode 9
    root = tmp_path / "crash"
    with pytest.raises(AssertionError, match="exited with"):
        run_world(WORKER, 2, {"mode": "crash", "root": str(root), "iterations": 3}, timeout=200,
                  extra_env={"MIMO_FAULT_CRASH_DURING_SAVE": "1:2"})
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (root / ".tmp_iter_0000002").exists() and not (root / "iter_0000002").exists()
    resumed = run_world(WORKER, 2, {"mode": "crash", "root": str(root), "iterations": 1}, timeout=200)
    assert all(r["start"] == 1 and r["records"][0]["iteration"] == 2 for r in resumed)
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (root / ".tmp_iter_0000002").exists()


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    return run_world(WORKER, 2, {"mode": "corrupt", "root": str(root)}, timeout=300)


@pytest.mark.parametrize("damage, file_named, words", [
    ("truncated_shard", ".distcp", "is truncated"),
    ("missing_shard", ".distcp", "is missing"),
    ("garbage_metadata", "/.metadata", "is unreadable"),
    ("garbage_common", "/common.pt", "is unreadable"),
    ("garbage_manifest", "/mimo_manifest.json", "is corrupt"),
    ("garbage_tracker", "/latest_checkpointed_iteration.txt", "not an iteration number"),
])
def test_damaged_checkpoint_is_one_error_naming_the_file(corrupt, damage, file_named, words):
    for rank in corrupt:  # every rank fails the same way, before any tensor is read
        outcome = rank[damage]
        assert outcome["error"] is not None, damage
        assert outcome["type"] == "CheckpointError", outcome
        assert file_named in outcome["error"] and words in outcome["error"], outcome
        assert "\n" not in outcome["error"]  # one line
