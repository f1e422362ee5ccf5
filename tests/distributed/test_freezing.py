"""--freeze-vit / --freeze-projection / --freeze-lm on the real job: frozen weights stay
bit-identical, trainable ones move, frozen modules stay in eval mode, a branch with nothing to
train runs with a stub optimizer (no hang, checkpointable), language PP2 trains through a
frozen language model. One 4-rank world (tests/workers/freeze_world.py) holds every case."""

import math

import pytest

from tests.harness import run_world
from tests.workers.freeze_world import (
    HETERO_CASES,
    HETERO_ITERS,
    PIPELINE_CASES,
    PIPELINE_ITERS,
    RESUMED,
)

pytestmark = pytest.mark.dist

ALL_CASES = [*HETERO_CASES, *PIPELINE_CASES]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # a hang in the multi-module schedule (frozen branch skipping its backward) times out here
    return run_world("tests.workers.freeze_world", 4,
                     {"root": str(tmp_path_factory.mktemp("freeze"))}, timeout=240)


def _runs(world, case):
    return [rank.cases[case] for rank in world]


@pytest.mark.parametrize("case", ALL_CASES)
def test_frozen_parts_are_bit_identical_and_trainable_parts_move(world, case):
    for rank, run in enumerate(_runs(world, case)):
        assert run.parts, rank
        for name, part in run.parts.items():
            where = (case, rank, name)
            assert part.requires_grad != part.frozen, where
            if part.frozen:
                assert part.unchanged and part.trainable == 0 and part.frozen_count > 0, where
            else:
                assert part.all_changed and part.frozen_count == 0 and part.trainable > 0, where


@pytest.mark.parametrize("case", ALL_CASES)
def test_every_step_counts_with_a_positive_world_grad_norm(world, case):
    iters = HETERO_ITERS if case in HETERO_CASES else PIPELINE_ITERS
    for run in _runs(world, case):
        assert len(run.records) == iters
        for record in run.records:
            assert not record["skipped"] and record["grad_norm"] > 0, record
            assert set(record["lr"]) == {"images", "language"}  # a frozen branch's LR is logged
            assert all(lr > 0 for lr in record["lr"].values()), record["lr"]


@pytest.mark.parametrize("case", ALL_CASES)
def test_frozen_branch_adds_nothing_to_the_grad_norm(world, case):
    """World grad norm^2 = images norm^2 + language norm^2; a branch without optimizer adds 0."""
    runs = _runs(world, case)
    images, language = runs[0], runs[-1]  # rank 0; rank 3 is language TP1/PP1 (norms span TP, PP)
    zeros = [0.0] * len(images.records)
    for step, record in enumerate(images.records):
        img = (images.branch_norms or zeros)[step]
        lang = (language.branch_norms or zeros)[step]
        assert record["grad_norm"] == pytest.approx(math.hypot(img, lang), rel=1e-6), (case, step)


@pytest.mark.parametrize("case", ALL_CASES)
def test_optimizer_holds_exactly_the_trainable_parameters(world, case):
    for run in _runs(world, case):
        assert run.optimizer_params == run.local_trainable
        assert run.stub_optimizer == (run.local_trainable == 0)


@pytest.mark.parametrize("case", list(HETERO_CASES))
def test_frozen_modules_stay_in_eval_mode_after_an_evaluation(world, case):
    for run in _runs(world, case):
        for name, part in run.parts.items():
            assert part.eval_mode if part.frozen else part.train_mode, (case, name)


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_language_pp2_trains_through_frozen_parts(world, case):
    runs = _runs(world, case)
    assert [(r.branch, r.stage) for r in runs] == [("images", 0), ("images", 0), ("language", 0),
                                                   ("language", 1)]
    losses = [record["loss"] for record in runs[-1].records]
    assert losses[-1] < losses[0] - 0.02, losses
    assert all([record["loss"] for record in r.records] == losses for r in runs)  # world-agreed


@pytest.mark.parametrize("case", RESUMED)
def test_a_branch_without_optimizer_saves_and_resumes_bit_exactly(world, case):
    for run in _runs(world, case):
        (resumed,) = run.resumed
        uninterrupted = run.records[-1]
        for key in ("loss", "grad_norm", "lr", "iteration"):
            assert resumed[key] == uninterrupted[key], (case, key)


def test_stage_two_loads_stage_one_weights_only_with_finetune(world):
    """A stage-1 checkpoint (vision tower and LLM frozen) into stage 2 (LLM trainable): a plain
    --load is refused in one line on every rank (its optimizer state trained another set);
    --finetune loads the weights, starts a fresh optimizer, and the LLM now learns."""
    for rank in world:
        stage = rank.stage_two
        assert "trained with frozen vit, lm, this run has frozen vit" in stage.refused
        assert "\n" not in stage.refused
        assert [r["iteration"] for r in stage.records] == [1, 2]
        assert all(not r["skipped"] and r["grad_norm"] > 0 for r in stage.records)
    assert [rank.stage_two.language_changed for rank in world[2:]] == [True, True]


@pytest.mark.parametrize("case", ALL_CASES)
def test_dry_run_counts_what_trains(world, case):
    """--dry-run's memory gives frozen parameters weights only: its trainable count per rank is
    what the built model trains."""
    from megatron_mimo.config.memory import trainable_parameters
    from megatron_mimo.config.presets import tiny_cpu, tiny_cpu_pp
    from tests.workers.freeze_world import make_cfg

    hetero = case in HETERO_CASES
    cfg = make_cfg(tiny_cpu if hetero else tiny_cpu_pp,
                   HETERO_CASES[case] if hetero else PIPELINE_CASES[case], 1)
    for run in _runs(world, case):
        assert run.local_trainable == trainable_parameters(cfg, run.branch, run.stage), run.branch
