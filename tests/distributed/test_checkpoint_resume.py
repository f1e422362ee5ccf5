"""Bit-exact resume: run A (2N straight) vs run B (N, save, stop) + run C (fresh processes,
load, N more), on three layouts, plus the field pitfalls of ../shared/PITFALLS.md."""

import json

import pytest

from tests.harness import run_world
from tests.workers.ckpt_world import N

pytestmark = pytest.mark.dist

WORKER = "tests.workers.ckpt_world"
RANKS = {"L1": 4, "L2": 4, "L3": 2, "NEMO": 4}  # NEMO: RADIO + Mamba hybrid (tiny_cpu_nemotron)
FULLY = {"checkpoint__dist_ckpt_optim_fully_reshardable": True}
OVERRIDES = {"L1": {}, "L2": FULLY, "L3": {}, "NEMO": {}}  # L2 saves optimizer state fully_reshardable


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def ab(root):
    return {layout: run_world(WORKER, RANKS[layout], {"mode": "ab", "layout": layout,
                                                      "root": str(root / layout),
                                                      "overrides": OVERRIDES[layout]}, timeout=300)
            for layout in RANKS}


@pytest.fixture(scope="module")
def c(root, ab):
    # L1 first probes L2's fully_reshardable checkpoint (another layout), L2 probes L1's
    # dp_reshardable one (must be refused at once), then each resumes its own.
    foreign = {"L1": root / "L2", "L2": root / "L1", "L3": None, "NEMO": None}
    return {layout: run_world(WORKER, RANKS[layout], {
        "mode": "c", "layout": layout, "root": str(root / layout), "overrides": OVERRIDES[layout],
        "foreign_root": str(foreign[layout]) if foreign[layout] else None}, timeout=300)
        for layout in RANKS}


@pytest.mark.parametrize("layout", list(RANKS))
def test_resumed_run_equals_straight_run_bitwise(ab, c, layout):
    for rank_ab, rank_c in zip(ab[layout], c[layout], strict=True):
        straight = rank_ab["a"][N:]
        resumed = rank_c["records"]
        assert [r["iteration"] for r in resumed] == list(range(N + 1, 2 * N + 1))
        for want, got in zip(straight, resumed, strict=True):
            for key in ("loss", "grad_norm", "lr", "consumed", "tokens", "flops"):
                assert got[key] == want[key], (layout, got["iteration"], key, got[key], want[key])
        # run B itself followed A for its N iterations
        assert rank_ab["b"] == rank_ab["a"][:N]


def test_resume_point_inside_warmup_and_run_crosses_into_decay(ab):
    lrs = [r["lr"]["language"] for r in ab["L3"][0]["a"]]
    peak = max(lrs)
    assert lrs[N - 1] < peak  # still warming up at the save
    assert lrs.index(peak) >= N and lrs[-1] < peak  # then peaks and decays


@pytest.mark.parametrize("layout", list(RANKS))
def test_rng_streams_and_data_indices_continue(ab, c, layout):  # pitfalls 6 and 8
    for rank_ab, rank_c in zip(ab[layout], c[layout], strict=True):
        assert rank_c["rng"] == rank_ab["snapshot"]["rng"]
        assert rank_c["indices"] == rank_ab["snapshot"]["indices"]
        assert rank_c["iteration"] == N and rank_c["consumed"] == N * 8
        assert rank_ab["a"][0]["flops"] > 0


@pytest.mark.parametrize("layout", list(RANKS))
def test_loss_right_after_load_equals_loss_at_save(ab, c, layout):  # pitfall 5
    for rank_ab, rank_c in zip(ab[layout], c[layout], strict=True):
        assert rank_c["eval_after_load"] == rank_ab["eval_at_save"]


@pytest.mark.parametrize("layout", ["L1", "L2"])  # dp_reshardable and fully_reshardable
def test_adam_state_round_trips_with_own_step_per_parameter(c, layout):  # pitfalls 1 and 13
    for rank in c[layout]:
        assert rank["adam_equal"]
        assert rank["steps_after_load"] and set(rank["steps_after_load"]) == {float(N)}
        assert set(rank["steps_after_one_more"]) == {float(N + 1)}


def test_language_optimizer_meta_round_trips_off_rank_zero(c):  # pitfall 4
    for rank in c["L1"]:
        meta = rank["optimizer_meta"]
        assert list(meta) == [rank["branch"]]
        assert meta[rank["branch"]]["param_state_sharding_type"] == "dp_reshardable"
        groups = meta[rank["branch"]]["param_groups"]
        assert groups and all(g["step"] == float(N) for g in groups)
        assert {g["max_lr"] for g in groups} == ({0.003} if rank["branch"] == "language" else {0.001})


def test_dp_reshardable_refuses_another_model_parallel_layout(c):
    for rank in c["L2"]:
        foreign = rank["foreign"]
        assert not foreign["ok"]
        assert "CheckpointError" in foreign["error"]
        assert "images TP1xDP2xPP1 on ranks 0-1" in foreign["error"]
        assert "images TP2xDP1xPP1 on ranks 0-1" in foreign["error"]


def test_fully_reshardable_resumes_under_another_layout(ab, c):
    saved_eval = ab["L2"][0]["eval_at_save"]
    for rank in c["L1"]:
        assert rank["foreign"]["ok"], rank["foreign"]
        assert rank["foreign"]["iteration"] == N
        assert rank["foreign"]["eval"] == pytest.approx(saved_eval, rel=1e-5)


def test_save_starts_no_helper_process(ab):
    # megatron-core's first save would spawn a multiprocessing Manager (~13 s here)
    assert all(not rank["helper_processes_after_save"] for layout in ab.values() for rank in layout)


def test_checkpoint_layout_on_disk(root, ab):
    directory = root / "L1" / f"iter_{N:07d}"
    names = {p.name for p in directory.iterdir()}
    assert {"common.pt", "metadata.json", ".metadata", "mimo_manifest.json"} <= names
    assert any(n.endswith(".distcp") for n in names)
    assert (root / "L1" / "latest_checkpointed_iteration.txt").read_text().strip() == str(N)
    manifest = json.loads((directory / "mimo_manifest.json").read_text())
    assert manifest["optimizer_sharding_type"] == "dp_reshardable"
    assert manifest["topology"]["language"] == {"tp": 2, "dp": 1, "pp": 1, "offset": 2}
    assert manifest["megatron_core_version"].startswith("0.")
    assert set(manifest["contents"]) == {"model", "optimizer", "scheduler", "rng", "data", "events"}
    assert not list(root.glob("L1/.tmp_*"))


@pytest.fixture(scope="module")
def flags(root, ab):
    return run_world(WORKER, 2, {"mode": "flags", "root": str(root / "L3")}, timeout=300)


def test_no_load_optim_starts_adam_fresh_but_continues_schedule(ab, flags):
    for rank_ab, rank in zip(ab["L3"], flags, strict=True):
        got = rank["no_load_optim"]
        assert got["adam_empty_or_zero"]
        assert got["iteration"] == N and got["consumed"] == N * 8
        assert got["lr"] == rank_ab["a"][N - 1]["lr"]
        assert got["rng"] == rank_ab["snapshot"]["rng"]
        assert got["next"]["loss"] == rank_ab["a"][N]["loss"]  # same weights and data...
        assert got["next"]["grad_norm"] == rank_ab["a"][N]["grad_norm"]


def test_no_load_rng_reseeds(ab, flags):
    for rank_ab, rank in zip(ab["L3"], flags, strict=True):
        got = rank["no_load_rng"]
        assert got["rng"] != rank_ab["snapshot"]["rng"]
        assert got["rng"] == rank["fresh"]["rng"]  # exactly what --seed gives a new run
        assert got["iteration"] == N and not got["adam_empty_or_zero"]


def test_finetune_loads_weights_only(ab, flags):
    for rank_ab, rank in zip(ab["L3"], flags, strict=True):
        got = rank["finetune"]
        assert got["iteration"] == 0 and got["consumed"] == 0
        assert got["lr"] == rank["fresh"]["lr"]
        assert got["adam_empty_or_zero"]
        assert got["eval"] == rank_ab["eval_at_save"]  # the weights are the checkpoint's
        assert got["next"]["iteration"] == 1 and got["next"]["consumed"] == 8


def test_no_load_scheduler_restarts_schedule(ab, flags):
    for rank_ab, rank in zip(ab["L3"], flags, strict=True):
        got = rank["no_load_scheduler"]
        assert got["iteration"] == N
        assert got["lr"] == rank["fresh"]["lr"] != rank_ab["a"][N - 1]["lr"]
        assert not got["adam_empty_or_zero"]


def test_resumed_schedule_comes_from_the_checkpoint_for_every_branch(ab, flags):  # pitfall 7
    # a resume with another --train-iters keeps the saved schedule, on both branches' LRs
    for rank_ab, rank in zip(ab["L3"], flags, strict=True):
        assert rank["longer_run"]["lr"] == rank_ab["a"][N - 1]["lr"]
        assert rank["longer_run"]["next"]["lr"] == rank_ab["a"][N]["lr"]
