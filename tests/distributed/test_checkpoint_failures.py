"""Checkpoint structure and failure handling: uneven shards, constant structure with optional
state, mismatched or missing ranks, a rank killed in the middle of a save.

Crashes and stalls are injected with named failpoints (:mod:`megatron_mimo.failpoints`,
enabled by MIMO_FAILPOINTS); a misspelt failpoint is an error, so no test here passes with
nothing injected."""

import json
import subprocess
import sys
import time

import psutil
import pytest

from tests.harness import REPO_ROOT, run_world

pytestmark = pytest.mark.dist

WORKER = "tests.workers.ckpt_failure_world"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    return run_world(WORKER, 4, {"mode": "features", "root": str(root)}, timeout=300)


def test_uneven_dp3_optimizer_shards_save_and_load(features):  # mode 3
    images_shards = [shard.size for shard in features[0].shards if shard.branch == "images"]
    assert len(images_shards) == 3 and len(set(images_shards)) > 1, images_shards
    for rank in features:
        assert rank.reloaded.iteration == 2
        assert rank.reloaded.eval == rank.eval_at_save


def test_structure_is_constant_when_optional_state_appears(features):  # mode 2
    for rank in features:
        first, second = rank.fingerprints
        assert first == second
        # the second save used the cached plan and still kept the (now non-empty) skip history
        assert rank.reloaded.skipped_at == [2]


def test_ranks_saving_different_iterations_fail_together(features):  # mode 3
    for rank in features:
        error = rank.mismatch.error
        assert error and "CheckpointError" in error and "ranks disagree" in error


def test_missing_rank_becomes_a_bounded_error_naming_it(features):  # mode 3
    survivors = [r.missing for r in features if not r.missing.skipped]
    assert len(survivors) == 3
    for outcome in survivors:
        assert outcome.error and "CheckpointError" in outcome.error
        assert "not every rank arrived within 5 s" in outcome.error  # --ckpt-timeout-s 5
    assert "3" in survivors[0].error  # rank 0 reports which rank never arrived


def _records(root, rank):
    return [json.loads(line) for line in (root / f"records_rank{rank}.jsonl").read_text().splitlines()]


def _survivors(root):
    """Processes (ranks or their writers) still running on ``root`` once the world is gone."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(root) in " ".join(proc.info["cmdline"] or []):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rank_killed_during_save_leaves_previous_checkpoint_loadable(tmp_path, mode):  # modes 9, 15
    # sync: rank 1 dies after writing its shards, before the publish; async: rank 1 dies while
    # every rank's background writer is still writing (stalled by a failpoint)
    root = tmp_path / "crash"
    overrides = {"checkpoint.async_save": True} if mode == "async" else {}
    failpoints = ("checkpoint.before_publish=exit(17)@rank1:iter2" if mode == "sync" else
                  "checkpoint.write_in_flight=exit(17)@rank1:iter2;"
                  "checkpoint.writer_start=sleep(60)@iter2")
    env = {"MIMO_FAILPOINTS": failpoints}
    # 17 is the failpoint's exit: the crash is the injected one, not some other failure
    with pytest.raises(AssertionError, match=r"exited with \[[^\]]*\b17\b"):
        run_world(WORKER, 2, {"mode": "crash", "root": str(root), "iterations": 3,
                              "overrides": overrides}, timeout=200, extra_env=env)
    time.sleep(0.5)
    assert _survivors(root) == []  # no writer outlives its rank
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (root / ".tmp_iter_0000002").exists() and not (root / "iter_0000002").exists()
    crashed = [_records(root, rank) for rank in range(2)]
    for rank in range(2):
        (root / f"records_rank{rank}.jsonl").unlink()
    resumed = run_world(WORKER, 2, {"mode": "crash", "root": str(root), "iterations": 1,
                                    "overrides": overrides}, timeout=200)
    for rank, outcome in enumerate(resumed):
        assert outcome.start == 1
        assert outcome.records == [crashed[rank][1]]  # iteration 2 again, bit for bit
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (root / ".tmp_iter_0000002").exists()


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("corrupt")


@pytest.fixture(scope="module")
def corrupt(corrupt_root):
    return run_world(WORKER, 2, {"mode": "corrupt", "root": str(corrupt_root)}, timeout=300)


@pytest.mark.parametrize("damage, file_named, words", [
    ("truncated_shard", ".distcp", "is truncated"),
    ("missing_shard", ".distcp", "is missing"),
    ("garbage_metadata", "/.metadata", "is unreadable"),
    ("garbage_common", "/common.pt", "is unreadable"),
    ("garbage_manifest", "/mimo_manifest.json", "is corrupt"),
    ("garbage_tracker", "/latest_checkpointed_iteration.txt", "not an iteration number"),
    ("flipped_bit", ".distcp", "is corrupt: its xxh3_128 checksum"),  # mode 14
])
def test_damaged_checkpoint_is_one_error_naming_the_file(corrupt, damage, file_named, words):
    for rank in corrupt:  # every rank fails the same way, before any tensor is read
        outcome = rank.loads[damage]
        assert outcome.error is not None, damage
        assert outcome.type == "CheckpointError", outcome
        assert file_named in outcome.error and words in outcome.error, outcome
        assert "\n" not in outcome.error  # one line


def test_retention_keeps_the_newest_k(corrupt):
    for rank in corrupt:  # three saves with --ckpt-keep-last 2
        assert rank.kept == ["iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]


def _tool(*args):
    done = subprocess.run([sys.executable, "-m", "megatron_mimo.main", "checkpoint", *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    return done.returncode, done.stdout.strip().splitlines()


def test_verify_tool_passes_a_sound_checkpoint_and_names_each_damaged_file(corrupt, corrupt_root,
                                                                         capsys):
    code, lines = _tool("verify", corrupt_root / "good")
    assert code == 0 and lines == [f"ok: {corrupt_root / 'good' / 'iter_0000003'}: complete, "
                                   "every checksum matches"]
    code, lines = _tool("verify", corrupt_root / "flipped_bit")
    assert code == 1 and len(lines) == 1 and "__" in lines[0] and "is corrupt" in lines[0], lines
    from megatron_mimo.checkpoint.tools import main as tools  # the other cases in this process

    for damage, words in (("truncated_shard", "is truncated"), ("missing_shard", "is missing"),
                          ("garbage_metadata", ".metadata is unreadable"),
                          ("garbage_common", "common.pt is unreadable"),
                          ("garbage_manifest", "mimo_manifest.json is corrupt"),
                          ("garbage_tracker", "not an iteration number")):
        assert tools(["verify", str(corrupt_root / damage)]) == 1
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (damage, lines)


def test_inspect_tool_prints_what_the_checkpoint_holds(corrupt, corrupt_root):
    code, lines = _tool("inspect", corrupt_root / "good")
    assert code == 0
    shown = json.loads("\n".join(lines))
    assert shown["iteration"] == 3 and shown["world_size"] == 2
    assert shown["layouts"]["language"] == {"tp": 1, "dp": 1, "pp": 1, "offset": 1}
    assert shown["train_state"]["consumed_samples"] == 24 and shown["train_state"]["consumed_tokens"] > 0
    assert {name: s["num_steps"] for name, s in shown["lr_schedule"].items()} == {"images": 3, "language": 3}
    assert set(shown["bytes_by_branch_and_dtype"]["language"]) == {"float32", "objects"}
    assert shown["config"]["checkpoint"]["ckpt_keep_last"] == 2


def test_kill_during_deletion_leaves_every_remaining_checkpoint_loadable(corrupt, corrupt_root, tmp_path):
    import shutil

    root = tmp_path / "retention"
    shutil.copytree(corrupt_root / "good", root)  # iterations 2 and 3, tracker at 3
    prune = f"from megatron_mimo.checkpoint import retention; retention.prune({str(root)!r}, 1)"
    done = subprocess.run([sys.executable, "-c", prune], cwd=REPO_ROOT, timeout=60,
                          env={"PYTHONPATH": str(REPO_ROOT),
                               "MIMO_FAILPOINTS": "checkpoint.prune_moved_aside=exit(17)"})
    assert done.returncode == 17  # killed between moving iteration 2 aside and deleting it
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000003"]
    from megatron_mimo.checkpoint.storage import remove_stale
    from megatron_mimo.checkpoint.tools import main as tools

    assert tools(["verify", str(root)]) == 0

    assert remove_stale(root) == [".tmp_deleting_iter_0000002"]



@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: one checkpoint of the two-rank layout (~3.7 MB) fits, two do not."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_one_line_naming_the_directory_and_latest_stays(small_disk):
    outcome = run_world(WORKER, 2, {"mode": "disk_full", "root": str(small_disk)}, timeout=200)
    root = small_disk / "ckpt"
    for rank in outcome:
        for attempt in ("sync", "async"):
            failed = rank.attempts[attempt]
            assert failed.type == "CheckpointError", failed
            assert f"to {root}: the disk is full" in failed.error and "\n" not in failed.error
            assert "still names iteration 1" in failed.error
            assert failed.tracker == 1
    assert outcome[0].attempts["sync"].leftovers == [".tmp_iter_0000002"]
    assert outcome[0].leftovers_at_start == [[], []]  # the next start removed it
    assert outcome[0].leftovers_at_last_start == []
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
