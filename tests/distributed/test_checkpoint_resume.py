"""Bit-exact resume: run A (2N straight) vs run B (N, save, stop) + run C (fresh processes,
load, N more), on four layouts, plus the resume failure modes of docs/checkpointing.md
(cited below as "mode N")."""

import json

import pytest

from tests.resume_worlds import AV, AV_DP, CASES, NEMOTRON, PP2, REPEATED, A, B
from tests.workers.async_memory import SAVES
from tests.workers.ckpt_layouts import TWO_RANKS, N
from tests.workers.ckpt_world import EXACT_KEYS

pytestmark = pytest.mark.dist

RANKS = {name: ranks for name, (_, ranks, _) in CASES.items()
         if name in (A, B, TWO_RANKS, NEMOTRON, PP2, AV)}
"""The layouts (fp32); test_precision checks the bf16 / fp16 cases of the same worlds."""
OBJECT_SLACK = 100
"""Python objects a later async save may add (measured: 0; one save's state dict is thousands)."""
RSS_SLACK = 16 << 20
"""RSS growth allowed from the second save to the last (measured 1-3 MB: the allocator)."""


@pytest.mark.parametrize("layout", list(RANKS))
def test_resumed_run_equals_straight_run_bitwise(saved, resumed, layout):
    for rank_saved, rank_resumed in zip(saved[layout], resumed[layout], strict=True):
        straight = rank_saved.straight[N:]
        resumed = rank_resumed.records
        assert [r["iteration"] for r in resumed] == list(range(N + 1, 2 * N + 1))
        for want, got in zip(straight, resumed, strict=True):
            for key in EXACT_KEYS:
                assert got[key] == want[key], (layout, got["iteration"], key, got[key], want[key])
        # run B itself followed A for its N iterations
        assert rank_saved.until_save == rank_saved.straight[:N]


def test_resume_point_inside_warmup_and_run_crosses_into_decay(saved):
    lrs = [r["lr"]["language"] for r in saved[TWO_RANKS][0].straight]
    peak = max(lrs)
    assert lrs[N - 1] < peak  # still warming up at the save
    assert lrs.index(peak) >= N and lrs[-1] < peak  # then peaks and decays


@pytest.mark.parametrize("layout", list(RANKS))
def test_rng_streams_and_data_indices_continue(saved, resumed, layout):  # modes 6 and 8
    for rank_saved, rank_resumed in zip(saved[layout], resumed[layout], strict=True):
        assert rank_resumed.position.rng == rank_saved.position_at_save.rng
        assert rank_resumed.position.indices == rank_saved.position_at_save.indices
        assert rank_resumed.iteration == N and rank_resumed.consumed_samples == N * 8
        assert rank_saved.straight[0]["floating_point_operations"] > 0


@pytest.mark.parametrize("layout", list(RANKS))
def test_loss_right_after_load_equals_loss_at_save(saved, resumed, layout):  # mode 5
    for rank_saved, rank_resumed in zip(saved[layout], resumed[layout], strict=True):
        assert rank_resumed.eval_after_load == rank_saved.eval_at_save


def test_pipeline_resume_is_bitwise_inside_warmup(saved, resumed):
    lrs = [r["lr"]["language"] for r in saved[PP2][0].straight]
    assert lrs[N - 1] < max(lrs) and lrs.index(max(lrs)) >= N  # resume point inside warmup
    for rank_saved, rank_resumed in zip(saved[PP2], resumed[PP2], strict=True):
        for want, got in zip(rank_saved.straight[N:], rank_resumed.records, strict=True):
            for key in EXACT_KEYS:
                assert got[key] == want[key], (got["iteration"], key, got[key], want[key])
        assert rank_resumed.eval_after_load == rank_saved.eval_at_save
        assert rank_resumed.position.rng == rank_saved.position_at_save.rng
        assert rank_resumed.adam_equals_saved and rank_resumed.main_params_equal
        assert set(rank_resumed.adam_steps_after_load) == {float(N)}


def test_fully_reshardable_resumes_across_a_language_pp_change(saved, resumed):
    for source, ranks, probe in ((saved[PP2], resumed[A], "from_pp2"),
                                 (saved[B], resumed[PP2], "from_pp1")):
        for rank in ranks:
            loaded = rank.probes[probe]
            assert loaded.ok, (probe, loaded)
            assert loaded.iteration == N
            assert loaded.eval == pytest.approx(source[0].eval_at_save, rel=1e-5), probe


def test_dp_reshardable_refuses_a_language_pp_change(resumed):
    for rank in resumed[PP2]:
        error = rank.probes["from_pp1_dp"].error
        assert not rank.probes["from_pp1_dp"].ok and "CheckpointError" in error
        assert "cannot resume the language branch" in error
        assert "language TP2xDP1xPP1 on ranks 2-3" in error and "language TP1xDP1xPP2 on ranks 2-3" in error


def test_every_language_layer_is_saved_once_across_stages(root, saved):
    from torch.distributed.checkpoint import FileSystemReader

    from tests.workers.ckpt_layouts import make_cfg

    num_layers = make_cfg(PP2).language.num_layers
    metadata = FileSystemReader(str(root / PP2 / f"iter_{N:07d}")).read_metadata()
    layer_keys = [k for k in metadata.state_dict_metadata
                  if k.startswith("language_model.decoder.layers.") and "_extra_state" not in k]
    assert layer_keys
    for key in layer_keys:
        tensor = metadata.state_dict_metadata[key]
        assert tensor.size[0] == num_layers, key  # global layer axis, not one stage's
        layers = [chunk.offsets[0] + i for chunk in tensor.chunks for i in range(chunk.sizes[0])]
        assert sorted(layers) == list(range(num_layers)), (key, layers)
    for key in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"):
        assert len(metadata.state_dict_metadata[key].chunks) == 1, key


@pytest.mark.parametrize("layout", [A, B])  # dp_reshardable and fully_reshardable
def test_adam_state_round_trips_with_own_step_per_parameter(resumed, layout):  # modes 1 and 13
    for rank in resumed[layout]:
        assert rank.adam_equals_saved
        assert rank.adam_steps_after_load and set(rank.adam_steps_after_load) == {float(N)}
        assert set(rank.adam_steps_after_one_more) == {float(N + 1)}


def test_language_optimizer_meta_round_trips_off_rank_zero(resumed):  # mode 4
    for rank in resumed[A]:
        meta = rank.optimizer_meta
        assert list(meta) == [rank.branch]
        assert meta[rank.branch]["param_state_sharding_type"] == "dp_reshardable"
        groups = meta[rank.branch]["param_groups"]
        assert groups and all(g["step"] == float(N) for g in groups)
        assert {g["max_lr"] for g in groups} == ({0.003} if rank.branch == "language" else {0.001})


def test_dp_reshardable_refuses_another_model_parallel_layout(resumed):
    for rank in resumed[B]:
        foreign = rank.probes["other_layout"]
        assert not foreign.ok
        assert "CheckpointError" in foreign.error
        assert "images TP1xDP2xPP1 on ranks 0-1" in foreign.error
        assert "images TP2xDP1xPP1 on ranks 0-1" in foreign.error


def _loads_as_saved(saved, resumed, case: str, probe: str, source: str) -> None:
    """Every rank of ``case`` loaded ``source``'s checkpoint (its probe ``probe``): the
    iteration and the held-out loss are those at the save."""
    saved_eval = saved[source][0].eval_at_save
    for rank in resumed[case]:
        foreign = rank.probes[probe]
        assert foreign.ok, foreign
        assert foreign.iteration == N
        assert foreign.eval == pytest.approx(saved_eval, rel=1e-5)


def test_fully_reshardable_resumes_under_another_layout(saved, resumed):
    _loads_as_saved(saved, resumed, A, "other_layout", B)


def test_three_branches_resume_under_another_audio_dp(saved, resumed):
    """fully_reshardable: the checkpoint of audio DP2 (images DP1) loads under audio DP1
    (images DP2): every branch's weights and optimizer state, the three schedulers."""
    assert [rank.branch for rank in resumed[AV_DP]] == ["images", "images", "audio", "language"]
    _loads_as_saved(saved, resumed, AV_DP, "other_audio_dp", AV)


def test_three_branch_checkpoint_holds_every_branch(root, saved, resumed):
    """Weights and optimizer state of the audio branch are saved under their own keys
    (``modality_submodules.audio.*``, ``mimo.audio.*``), and the manifest records the audio
    model; the records log the three branches' LRs."""
    from megatron_mimo.checkpoint.tools import layout_of_bytes

    directory = root / AV / f"iter_{N:07d}"
    sizes = layout_of_bytes(directory, ("images", "audio", "language"))
    assert {"images", "audio", "language"} <= set(sizes), sizes
    assert sizes["audio"]["float32"] > 0
    manifest = json.loads((directory / "mimo_manifest.json").read_text())
    assert set(manifest["model"]) == {"images", "audio", "language"}
    assert set(manifest["topology"]) == {"images", "audio", "language"}
    assert all(set(r["lr"]) == {"images", "audio", "language"} for r in resumed[AV][0].records)


@pytest.mark.parametrize("layout", [B, TWO_RANKS])
def test_async_save_pending_at_exit_interval_is_published_before_exit(root, saved, layout):
    # --exit-interval stopped the loop right after the save at N was handed to the background
    # writer; the run waited for it, published it, and the resume tests above load it.
    for rank in saved[layout]:
        assert rank.finished_by_wait == [N]
    assert (root / layout / "latest_checkpointed_iteration.txt").read_text().strip() == str(N)


def test_memory_does_not_grow_over_repeated_async_saves(saved):
    # 5 async saves, training on while each is written: after the first is published, every
    # later one leaves the process holding the same tensors and Python objects (no state copy,
    # request or plan kept per save), megatron's queue empty, no helper process and one writer
    # thread for every save (a thread per save grows the RSS by a malloc arena's worth each)
    for held in saved[REPEATED]:
        assert held.pending == [0] * SAVES and held.helpers == [1] * SAVES, held
        assert len(set(held.tensor_bytes)) == 1, held.tensor_bytes
        assert held.objects[-1] - held.objects[1] <= OBJECT_SLACK, held.objects
        assert held.rss[-1] - held.rss[1] <= RSS_SLACK, held.rss


def test_async_save_writes_the_state_at_the_save_while_training_goes_on(saved):
    # the loop stepped while each (held back) writer ran, and the last checkpoint still loads
    # the main parameters of its iteration: the writer wrote a snapshot, not live tensors
    for held in saved[REPEATED]:
        assert min(held.steps_during_write) >= 1, held.steps_during_write
        assert held.loads_as_saved


def test_sync_save_never_waits(saved):
    assert all(rank.finished_by_wait == [] for rank in saved[A])


def test_save_starts_no_helper_process(saved):
    # megatron-core's first save would spawn a multiprocessing Manager (~13 s here); an async
    # save's writer is a thread of the rank
    assert all(not rank.helper_processes_after_save for name, layout in saved.items()
               if name != REPEATED for rank in layout)


def test_checkpoint_layout_on_disk(root, saved):
    directory = root / A / f"iter_{N:07d}"
    names = {p.name for p in directory.iterdir()}
    assert {"common.pt", "metadata.json", ".metadata", "mimo_manifest.json"} <= names
    assert any(n.endswith(".distcp") for n in names)
    assert (root / A / "latest_checkpointed_iteration.txt").read_text().strip() == str(N)
    manifest = json.loads((directory / "mimo_manifest.json").read_text())
    assert manifest["optimizer_sharding_type"] == "dp_reshardable"
    assert manifest["topology"]["language"] == {"tp": 2, "dp": 1, "pp": 1, "offset": 2}
    assert manifest["megatron_core_version"].startswith("0.")
    assert set(manifest["contents"]) == {"model", "optimizer", "scheduler", "rng", "data", "events"}
    assert not list(root.glob(f"{A}/.tmp_*"))


@pytest.fixture(scope="module")
def flags(resumed):
    return resumed["flags"]


def test_no_load_optim_starts_adam_fresh_but_continues_schedule(saved, flags):
    for rank_saved, rank in zip(saved[TWO_RANKS], flags, strict=True):
        got = rank.no_load_optim
        assert got.adam_empty_or_zero
        assert got.iteration == N and got.consumed_samples == N * 8
        assert got.lr == rank_saved.straight[N - 1]["lr"]
        assert got.rng == rank_saved.position_at_save.rng
        assert got.next["loss"] == rank_saved.straight[N]["loss"]  # same weights and data...
        assert got.next["grad_norm"] == rank_saved.straight[N]["grad_norm"]


def test_no_load_rng_reseeds(saved, flags):
    for rank_saved, rank in zip(saved[TWO_RANKS], flags, strict=True):
        got = rank.no_load_rng
        assert got.rng != rank_saved.position_at_save.rng
        assert got.rng == rank.fresh.rng  # exactly what --seed gives a new run
        assert got.iteration == N and not got.adam_empty_or_zero


def test_finetune_loads_weights_only(saved, flags):
    for rank_saved, rank in zip(saved[TWO_RANKS], flags, strict=True):
        got = rank.finetune
        assert got.iteration == 0 and got.consumed_samples == 0
        assert got.lr == rank.fresh.lr
        assert got.adam_empty_or_zero
        assert got.eval == rank_saved.eval_at_save  # the weights are the checkpoint's
        assert got.next["iteration"] == 1 and got.next["consumed_samples"] == 8


def test_no_load_scheduler_restarts_schedule(saved, flags):
    for rank_saved, rank in zip(saved[TWO_RANKS], flags, strict=True):
        got = rank.no_load_scheduler
        assert got.iteration == N
        assert got.lr == rank.fresh.lr != rank_saved.straight[N - 1]["lr"]
        assert not got.adam_empty_or_zero


def test_resumed_schedule_comes_from_the_checkpoint_for_every_branch(saved, flags):  # mode 7
    # a resume with another --train-iters keeps the saved schedule, on both branches' LRs
    for rank_saved, rank in zip(saved[TWO_RANKS], flags, strict=True):
        assert rank.longer_run.lr == rank_saved.straight[N - 1]["lr"]
        assert rank.longer_run.next["lr"] == rank_saved.straight[N]["lr"]
