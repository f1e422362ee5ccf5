"""Hugging Face import and export against transformers itself (tiny random models built
in-process, nothing downloaded): bit-identical round trips, ``from_pretrained`` with no missing
or unexpected key, our logits equal to transformers' at TP1 and at hetero layouts, and one-line
errors for bad input."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_world

pytestmark = pytest.mark.dist
MODULE = "tests.workers.convert_world"
TOLERANCE = 1e-5
"""fp32 logits: ours against transformers'."""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    (result,) = run_world(MODULE, 1, {"mode": "one", "tmp": str(tmp)}, timeout=600)
    return tmp, result


@pytest.mark.parametrize("name", ["clip", "siglip", "tied", "pair"])
def test_import_export_is_bit_identical_and_logits_match_transformers(converted, name):
    _, result = converted
    (trip,) = [t for t in result.trips if t.name == name]
    assert trip.identical, f"{name}: the export differs from the imported tensors"
    assert trip.loading_info == {"missing_keys": [], "unexpected_keys": [],
                                 "mismatched_keys": [], "error_msgs": []}
    assert trip.max_logit_error < TOLERANCE, trip
    assert trip.padding_logits == 0.0, "the vocabulary padding must be zero rows"


EXPECTED_ERRORS = {
    "non-llava": "is not LlavaForConditionalGeneration",
    "missing-shard": "model-00002-of-",
    "no-image-token": "has no image token '<image>'",
    "not-imported": "hf/conversion.json is missing",
}


def test_bad_input_is_one_line_and_exit_code_1(converted):
    _, result = converted
    assert sorted(b.case for b in result.bad) == sorted(EXPECTED_ERRORS)
    for bad in result.bad:
        lines = bad.stderr.strip().splitlines()
        assert bad.code == 1 and len(lines) == 1, bad
        assert lines[0].startswith("megatron-mimo: error: ") and EXPECTED_ERRORS[bad.case] in lines[0]


LAYOUTS = {
    # images TP1xDP2 on ranks 0-1, language TP2 (one of the two key/value groups per rank) on
    # ranks 2-3; then 2 training steps and a save, which the export test reads
    "images_dp2_language_tp2": (4, {"training.train_iters": 2}),
    # language in two pipeline stages on ranks 1-2, started with --pretrained-checkpoint
    "language_pp2": (3, {"images_parallel.dp": 1, "language_parallel.tp": 1,
                         "language_parallel.pp": 2, "language_parallel.offset": 1}),
}


def transformers_logits(directory, ids, pixels):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_at_hetero_layouts_match_transformers(converted, layout):
    tmp, _ = converted
    world, overrides = LAYOUTS[layout]
    overrides = {"training.micro_batch_size": 2, "training.global_batch_size": 4, **overrides}
    if "training.train_iters" in overrides:
        overrides["checkpoint.save"] = str(tmp / "trained")
    args = {"mode": "layout", "checkpoint": str(tmp / "clip-ckpt"), "overrides": overrides}
    if layout == "language_pp2":
        args["empty"] = str(tmp / "no-checkpoint-yet")
    ranks = run_world(MODULE, world, args, timeout=300)
    pixels = {k: p for r in ranks if r.branch == "images" for k, p in zip(r.keys, r.pixels, strict=True)}
    (last, *_) = [r for r in ranks if r.branch == "language"]
    assert sorted(pixels) == sorted(last.keys) and len(last.keys) == 4
    ids = torch.tensor(last.input_ids)
    ours = torch.tensor(last.logits)
    reference = transformers_logits(tmp / "clip", ids,
                                    torch.tensor([pixels[k] for k in last.keys]))
    error = (ours[..., :reference.shape[-1]] - reference).abs().max().item()
    assert error < TOLERANCE, (layout, error)


def test_export_after_training_differs_and_loads(converted):
    """The run trained at TP2 from the import: its checkpoint carries hf/, exports to a LLaVA
    that transformers loads with no missing key, and its weights moved."""
    import subprocess
    import sys

    from tests.workers.convert_world import hf_state

    tmp, _ = converted
    trained = tmp / "trained"
    if not trained.exists():
        pytest.skip("needs test_logits_at_hetero_layouts_match_transformers[images_dp2_language_tp2]")
    assert (trained / "hf" / "conversion.json").exists(), "the run did not carry hf/ along"
    out = tmp / "trained-export"
    done = subprocess.run([sys.executable, "-m", "megatron_mimo.main", "convert", "export-hf",
                           str(trained), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from transformers import LlavaForConditionalGeneration

    _, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before, after = hf_state(tmp / "clip"), hf_state(out)
    assert sorted(before) == sorted(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "language_model.lm_head.weight" in changed and "multi_modal_projector.linear_1.weight" in changed
    # the tower's unused last layer never trains: it comes back exactly
    assert torch.equal(before["vision_tower.post_layernorm.weight"],
                       after["vision_tower.post_layernorm.weight"])


def test_a_run_started_from_an_import_resumes_bit_exactly(converted):
    """--pretrained-checkpoint, then --load once the run saved (fresh processes): every metrics
    record of 2 + 2 iterations equals the straight run's (CLIP tower with dropout-free quick
    GELU, Llama with grouped-query attention, hetero layout)."""
    tmp, _ = converted
    args = {"mode": "resume", "tmp": str(tmp / "resume"), "checkpoint": str(tmp / "clip-ckpt"),
            "flags": ["--encoder-dp", "1", "--llm-tp", "1", "--llm-offset", "1",
                      "--micro-batch-size", "2", "--global-batch-size", "2",
                      "--lr-warmup-iters", "1"]}
    saved = run_world(MODULE, 2, {**args, "phase": "save"}, timeout=300)
    resumed = run_world(MODULE, 2, {**args, "phase": "resume"}, timeout=300)
    for before, after in zip(saved, resumed, strict=True):
        straight = before.runs["straight"]
        assert before.runs["first"] + after.runs["second"] == straight
        assert straight[0]["iteration"] == 1 and len(straight) == 4
