"""Mixed precision: bf16 and fp16 train with fp32 main parameters and resume bit for bit (loss,
grad norm, both LRs, loss scale); the fp16 loss scaler moves on the world's found-inf verdict;
checkpoint keys do not depend on the precision. The Mamba hybrid (RADIO + hybrid, 4 ranks) trains and
resumes in bf16 too."""

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.resume_worlds import CASES as ALL
from tests.resume_worlds import NEMOTRON, OVERFLOW_AT
from tests.workers.ckpt_layouts import TWO_RANKS, N
from tests.workers.ckpt_world import EXACT_KEYS

pytestmark = pytest.mark.dist

FP32 = TWO_RANKS
"""The fp32 two-rank case (it saves asynchronously; the records do not depend on that)."""
CASES = {name: ALL[name] for name in (FP32, "bf16_two_ranks", "fp16_two_ranks", "bf16_nemotron")}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_equals_straight_run_bitwise(saved, resumed, case):
    for rank_saved, rank_resumed in zip(saved[case], resumed[case], strict=True):
        straight, again = rank_saved.straight[N:], rank_resumed.records
        for want, got in zip(straight, again, strict=True):
            for key in EXACT_KEYS:
                assert got[key] == want[key], (case, got["iteration"], key, got[key], want[key])
        assert rank_saved.until_save == rank_saved.straight[:N]
        assert rank_saved.straight[N - 1]["lr"]["language"] < max(
            r["lr"]["language"] for r in rank_saved.straight)  # the save is inside warmup


@pytest.mark.parametrize("case", ["bf16_two_ranks", "fp16_two_ranks", "bf16_nemotron"])
def test_fp32_main_params_after_load_equal_the_saved_ones_bitwise(resumed, case):
    for rank in resumed[case]:
        assert rank.main_params_equal  # never re-derived from the 16-bit weights
        assert rank.main_param_dtypes == ["torch.float32"]
        assert rank.model_dtypes == ["torch.float16" if case.startswith("fp16") else "torch.bfloat16"]


def test_bf16_follows_fp32_and_learns(saved):
    fp32 = [r["loss"] for r in saved[FP32][0].straight]
    bf16 = [r["loss"] for r in saved["bf16_two_ranks"][0].straight]
    assert bf16[-1] < bf16[0]
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=5e-3)  # bf16 keeps ~3 significant digits


def test_fp16_overflow_on_images_ranks_only_skips_everywhere(saved):
    ranks = saved["fp16_two_ranks"]
    assert ranks[0].straight == ranks[1].straight  # images and language ranks agree
    before, hit = ranks[0].straight[OVERFLOW_AT - 2], ranks[0].straight[OVERFLOW_AT - 1]
    assert hit["skipped"] and hit["skipped_iterations"] == 1 and hit["grad_norm"] is None
    assert hit["loss_scale"] == before["loss_scale"] / 2  # hysteresis 1: halves at once
    assert hit["lr"] == before["lr"]  # no scheduler advanced
    scalers = [rank.scaler_at_save for rank in ranks]
    assert scalers[0] == scalers[1] and len(scalers[0]) == 1  # both branches' scalers agree


def test_grad_scaler_round_trips_on_every_rank(saved, resumed):
    for rank_saved, rank_resumed in zip(saved["fp16_two_ranks"], resumed["fp16_two_ranks"],
                                        strict=True):
        assert rank_resumed.branch in ("images", "language")
        assert rank_resumed.scaler_after_load == rank_saved.scaler_at_save
        state = rank_resumed.scaler_after_load[0]
        assert state["growth_tracker"] == 1  # saved in the middle of a growth window


def test_resume_in_another_precision_needs_finetune(saved, resumed):
    for rank in resumed["bf16_two_ranks"]:
        fp32 = rank.probes["fp32"]
        assert not fp32.ok
        assert "trained in fp32 and this run trains in bf16" in fp32.error
        assert "--finetune" in fp32.error
        assert rank.finetune.iteration == 0
    fp32_eval = saved[FP32][0].eval_at_save
    assert resumed["bf16_two_ranks"][0].finetune.eval == pytest.approx(fp32_eval, rel=1e-2)


def test_no_load_optim_rederives_main_params_from_the_loaded_weights(saved, resumed):
    for rank_saved, rank_resumed in zip(saved["bf16_two_ranks"], resumed["bf16_two_ranks"],
                                        strict=True):
        first, second = rank_resumed.no_load_optim
        straight = rank_saved.straight
        assert first["loss"] == straight[N]["loss"]  # the loaded weights, before any update
        # one step with fresh Adam moments from the loaded weights: close to the straight run,
        # far from the initial weights' loss (what stale main params would bring back)
        assert second["loss"] == pytest.approx(straight[N + 1]["loss"], rel=2e-2)
        assert abs(second["loss"] - straight[0]["loss"]) > 0.1


def _model_keys(directory):
    metadata = FileSystemReader(str(directory)).read_metadata()
    return {k for k in metadata.state_dict_metadata
            if k.startswith(("language_model.", "modality_submodules."))}


def test_local_spec_checkpoints_name_norms_as_transformer_engine_does(root, saved):
    # TE fuses each pre-attention / pre-MLP norm into the linear after it; a checkpoint written
    # with the local specs (CPU) must use those names to load into a GPU build (GPT, ViT, RADIO)
    iteration = f"iter_{N:07d}"
    for case in (FP32, NEMOTRON):
        keys = _model_keys(root / case / iteration)
        branches = ("language_model.", "modality_submodules.images.") if case == FP32 else \
            ("modality_submodules.images.",)
        for branch in branches:
            mine = {k for k in keys if k.startswith(branch)}
            assert any(k.endswith("linear_qkv.layer_norm_weight") for k in mine), (case, branch)
            assert any(k.endswith("linear_fc1.layer_norm_weight") for k in mine), (case, branch)
            assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in mine), \
                (case, branch)


def test_model_keys_are_the_same_in_every_precision(root, saved):
    iteration = f"iter_{N:07d}"
    keys = {name: _model_keys(root / name / iteration) for name in (FP32, "bf16_two_ranks", "fp16_two_ranks")}
    assert keys[FP32] and len(set(map(frozenset, keys.values()))) == 1
    assert not any(".module." in key for key in keys["bf16_two_ranks"])
