"""Hetero training: equivalence with a single-rank reference, layouts, world-agreed skips."""

import pytest

from tests.harness import run_world
from tests.workers.training_world import LLAMA, LLAMA_LAYOUT

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def references():
    """Single-rank truth for the GPT and the Mamba-hybrid language model."""
    return run_world("tests.workers.training_world", 1, {"mode": "reference"}, timeout=240)[0]


@pytest.fixture(scope="module")
def reference(references):
    return references.gpt


@pytest.fixture(scope="module")
def hetero():
    return run_world("tests.workers.training_world", 2, {"mode": "hetero"}, timeout=240)


@pytest.fixture(scope="module")
def layouts():
    return run_world("tests.workers.training_world", 4, {"mode": "layouts"}, timeout=400)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_two_rank_hetero_matches_single_rank_reference(hetero, reference):
    assert [r.branch for r in hetero] == ["images", "language"]
    for rank in hetero:  # every rank holds the same world-agreed values
        records = [s.record for s in rank.steps]
        for step, (got, want) in enumerate(zip(records, reference, strict=True)):
            assert _rel(got["loss"], want.loss) < 1e-6, (step, got["loss"], want.loss)
            assert _rel(got["grad_norm"], want.grad_norm) < 1e-5, (step, got, want)
            assert got["lr"] == pytest.approx(want.lr, rel=1e-12)
            assert not got["skipped"]


@pytest.mark.parametrize("layout", ["images_tp1dp2_language_tp2dp1", "images_tp2dp1_language_tp1dp2"])
def test_four_rank_layouts_train_and_match_reference(layouts, reference, layout):
    for rank in layouts:
        steps = rank.runs[layout].steps
        losses = [s.record["loss"] for s in steps]
        assert losses[-1] < 0.95 * losses[0], losses
        for got, want in zip(steps, reference, strict=True):
            assert _rel(got.record["loss"], want.loss) < 1e-5
        # warmup starts at LR 0 (Megatron's default), so only the first step leaves weights as-is
        assert not steps[0].params_changed
        assert all(s.params_changed for s in steps[1:])
    assert [rank.runs[layout].branch for rank in layouts] == ["images", "images", "language", "language"]


def test_llama_language_tp2_with_grouped_query_attention_matches_reference(layouts, references):
    """RMSNorm, SwiGLU ([gate; up] split over TP), 2 key/value groups at TP2, no biases, RoPE
    base 500000, tied output layer: the same records as one rank building the same modules."""
    assert references.llama[0].loss != references.gpt[0].loss  # the options reached the model
    for rank in layouts:
        steps = rank.runs[LLAMA_LAYOUT].steps
        for step, (got, want) in enumerate(zip(steps, references.llama, strict=True)):
            assert _rel(got.record["loss"], want.loss) < 1e-5, (step, got.record, want)
            assert _rel(got.record["grad_norm"], want.grad_norm) < 1e-5, (step, got.record, want)
        assert all(s.params_changed for s in steps[1:])


def test_found_inf_on_images_ranks_skips_everywhere(layouts):
    for rank in layouts:
        first, injected, after = rank.found_inf.steps
        assert not first.record["skipped"] and not after.record["skipped"]
        assert injected.record["skipped"], f"rank {rank.world_rank} did not skip"
        assert injected.record["grad_norm"] is None
        assert not injected.params_changed  # no branch stepped
        assert injected.record["lr"] == injected.lr_before  # no scheduler advanced
        assert injected.sched_steps == first.sched_steps == 1
        assert after.sched_steps == 2 and after.params_changed


def test_parallel_state_never_initialised(layouts, hetero):
    assert all(rank.parallel_state_untouched for rank in layouts)


@pytest.mark.parametrize("layout", ["images_tp1dp2_language_tp2dp1", "images_tp2dp1_language_tp1dp2",
                                    LLAMA_LAYOUT])
def test_dry_run_parameter_count_matches_the_built_model(layouts, layout):
    from megatron_mimo.config.memory import branch_parameters
    from tests.workers.training_world import LAYOUTS, make_cfg

    cfg = make_cfg({**LAYOUTS, LLAMA_LAYOUT: LLAMA}[layout])
    for rank in layouts:
        got = rank.runs[layout]
        assert got.local_parameters == branch_parameters(cfg, got.branch), (layout, got.branch)


@pytest.fixture(scope="module")
def pipeline():
    return run_world("tests.workers.training_world", 4, {"mode": "pipeline"}, timeout=400)


@pytest.mark.parametrize("kind", ["gpt", "mamba_hybrid"])
def test_language_pp2_matches_single_rank_reference(pipeline, references, kind):
    """megatron-core's 1F1B schedule, language over 2 stages, 4 micro-batches (2 per stage)."""
    assert [getattr(r, kind).branch for r in pipeline] == ["images", "images", "language", "language"]
    for rank in pipeline:
        steps = getattr(rank, kind).steps
        records = [s.record for s in steps]
        for step, (got, want) in enumerate(zip(records, getattr(references, kind), strict=True)):
            assert _rel(got["loss"], want.loss) < 1e-6, (rank.world_rank, step, got, want)
            assert _rel(got["grad_norm"], want.grad_norm) < 1e-5, (step, got, want)
            assert got["lr"] == pytest.approx(want.lr, rel=1e-12)
            assert not got["skipped"]
        assert all(s.params_changed for s in steps[1:])  # every stage and the encoder learn


def test_language_pp2_evaluates_like_one_stage(pipeline, layouts):
    """Held-out loss and answer accuracy after the same training: PP2 (last stage, a second
    logits pass) against the one-stage language TP2 layout; every rank holds the same values."""
    one_stage = layouts[0].runs["images_tp1dp2_language_tp2dp1"].eval
    assert one_stage.accuracy > 0  # else a PP2 that counts nothing would pass
    for rank in pipeline:
        got = rank.gpt.eval
        assert _rel(got.loss, one_stage.loss) < 1e-5, (got, one_stage)
        assert got.accuracy == one_stage.accuracy, (got, one_stage)


def test_found_inf_on_last_language_stage_only_skips_everywhere(pipeline):
    for rank in pipeline:
        first, injected, after = rank.found_inf.steps
        assert injected.record["skipped"], f"rank {rank.world_rank} did not skip"
        assert not injected.params_changed and injected.record["lr"] == injected.lr_before
        assert not first.record["skipped"] and not after.record["skipped"] and after.params_changed


@pytest.mark.parametrize("kind", ["gpt", "mamba_hybrid"])
def test_dry_run_parameter_count_matches_each_pipeline_stage(pipeline, kind):
    from megatron_mimo.config.memory import branch_parameters
    from tests.workers.training_world import HYBRID, PIPELINE, make_cfg

    cfg = make_cfg({**PIPELINE, **(HYBRID if kind == "mamba_hybrid" else {})})
    for rank in pipeline:
        got = getattr(rank, kind)
        assert got.local_parameters == branch_parameters(cfg, got.branch, got.stage), got.stage


@pytest.mark.parametrize("layout", ["av_language_tp2", "av_language_pp2"])
def test_three_branches_match_a_single_rank_reference(pipeline, references, layout):
    """Images on rank 0, audio on rank 1, language TP2 (or TP1xPP2) on ranks 2-3: two bridges
    into language stage 0, three optimizers and schedulers; the records equal one rank running
    the three modules (loss, grad norm, every branch's LR)."""
    from megatron_mimo.config.memory import branch_parameters
    from tests.workers.training_world import AV_LAYOUTS, make_cfg

    cfg = make_cfg(AV_LAYOUTS[layout])
    assert [r.av[layout].branch for r in pipeline] == ["images", "audio", "language", "language"]
    for rank in pipeline:
        steps = rank.av[layout].steps
        for step, (got, want) in enumerate(zip(steps, references.av, strict=True)):
            record = got.record
            assert _rel(record["loss"], want.loss) < 1e-6, (rank.world_rank, step, record, want)
            assert _rel(record["grad_norm"], want.grad_norm) < 1e-6, (step, record, want)
            assert set(record["lr"]) == {"images", "audio", "language"}
            assert record["lr"] == pytest.approx(want.lr, rel=1e-12)
            assert not record["skipped"]
        assert all(s.params_changed for s in steps[1:])  # every branch learns
        run = rank.av[layout]  # --dry-run's count of each branch's rank is the built one
        assert run.local_parameters == branch_parameters(cfg, run.branch, run.stage), run.branch


def test_each_input_carries_its_own_answer(pipeline):
    """Three branches on mock samples (16 classes each; chance 1/16): with silent clips the
    clip's answer stays at chance while the image's is learned, and the mirror case with blank
    images. (Both learned together: ``make train CONFIG=tiny_cpu_av``, README.)"""
    from tests.workers.training_world import AV_LEARN_ITERS

    got = {name: (e.accuracy, e.audio_accuracy) for name, e in pipeline[0].ablations.items()}
    assert all(r.ablations == pipeline[0].ablations for r in pipeline)  # world-agreed
    print(f"held-out (image, clip) answer accuracy after {AV_LEARN_ITERS} iterations: {got}")
    (image, silent), (blank, clip) = got["blank_audio"], got["blank_images"]
    assert image > 0.3 and silent < 0.2, got
    assert clip > 0.3 and blank < 0.2, got
