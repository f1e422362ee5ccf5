"""Each CPU shim is needed (the megatron-core call fails without it) and works (it passes with it)."""

import pytest
import torch

from tests.harness import run_world

pytestmark = [pytest.mark.dist,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims apply only without a GPU")]


@pytest.fixture(scope="module")
def report():
    return run_world("tests.workers.shims_check", world_size=1, timeout=120)[0]


@pytest.mark.parametrize("check", ["l2_norm", "clip", "stream", "current_device", "bridge_group",
                                   "dot_cuda", "rng_tracker", "hybrid_final_norm"])
def test_call_fails_without_shims(report, check):
    assert not report["before"][check]["ok"], report["before"][check]


def test_calls_give_cpu_results_with_shims(report):
    after = report["after"]
    assert all(v["ok"] for v in after.values()), after
    assert after["l2_norm"]["value"] == ["cpu", 5.0]
    assert after["clip"]["value"] == pytest.approx([0.5, 0.5], rel=1e-5)  # 2.0 * 1/(4+1e-6)
    assert after["current_device"]["value"] == "cpu"
    assert after["bridge_group"]["value"] == "gloo"
    assert after["dot_cuda"]["value"] == "cpu"
    assert after["rng_tracker"]["value"] is True  # the named stream lives on the CPU generator
    assert after["hybrid_final_norm"]["value"] == "RMSNorm"


def test_every_shim_applied_once(report):
    assert report["applied"] == report["all"]
    assert report["reapply"] == []
    assert report["dynamo_disabled"] is True
