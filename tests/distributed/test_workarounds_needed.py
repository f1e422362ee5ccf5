"""Each process workaround (``compat/cpu.py``, ``compat/mcore.py``) is needed: the
megatron-core call it covers fails without it, and works with it. (The fully_reshardable resume
tests prove fully_reshardable_load_keeps_adam_step: they raise KeyError 'step' without it.)"""

import pytest
import torch

from tests.harness import run_world
from tests.workers.workarounds_world import Attempt, Report

pytestmark = [pytest.mark.dist,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU workarounds apply only without a GPU")]


@pytest.fixture(scope="module")
def report() -> Report:
    return run_world("tests.workers.workarounds_world", world_size=1, timeout=120)[0]


@pytest.mark.parametrize("check", ["memory_buffer", "save_queue", "l2_norm", "clip", "stream",
                                   "current_device", "bridge_group", "dot_cuda", "rng_tracker",
                                   "hybrid_final_norm"])
def test_call_fails_without_workarounds(report, check):
    assert not report.before[check].ok, report.before[check]


def test_calls_work_with_workarounds(report):
    after = report.after
    assert all(attempt.ok for attempt in after.values()), after
    assert after["l2_norm"].value == ["cpu", 5.0]
    assert after["clip"].value == pytest.approx([0.5, 0.5], rel=1e-5)  # 2.0 * 1/(4+1e-6)
    assert after["current_device"].value == "cpu"
    assert after["bridge_group"].value == "gloo"
    assert after["dot_cuda"].value == "cpu"
    assert after["rng_tracker"].value is True  # the named stream lives on the CPU generator
    assert after["hybrid_final_norm"].value == "RMSNorm"
    assert after["memory_buffer"].value == "GlobalMemoryBuffer"
    assert after["save_queue"].value == "Queue"  # in-process, no helper process


def test_views_are_saved_without_a_copy_in_the_training_loop(report):
    # without the alias megatron-core's writer clones every view (all DDP weights) in the loop
    assert report.view_in_place_without_alias == Attempt(ok=True, value=False)
    assert report.after["view_in_place"] == Attempt(ok=True, value=True)


def test_async_save_finalises_on_the_group_given(report):
    # finalised_on: megatron's strategy finalises over the default group, which the loop uses
    # while an async save's writer thread finalises; ours over the writers' own group
    assert report.finalisation_group_stock == Attempt(ok=True, value="default")
    assert report.after["finalisation_group"] == Attempt(ok=True, value="own")


def test_every_process_workaround_applied_once(report):
    assert report.applied == report.expected and len(report.expected) == 10
    assert report.reapply == []
    assert report.dynamo_disabled is True


def test_a_load_reads_through_our_reader(report):
    # read_by: megatron's load builds its own reader, which parses .metadata again (~0.2 s at
    # production size) and reads through a temporary copy; through ours it parses none and
    # reads the tensor in place
    assert report.metadata_reads_stock == Attempt(ok=True, value=[1, 0])
    assert report.after["metadata_reads"] == Attempt(ok=True, value=[0, 1])


def test_the_writer_leaves_the_flush_to_the_checksums(report):
    # write_unflushed: megatron's write function fsyncs each file itself, so hashing the files
    # can only follow the flush; ours writes the same bytes and leaves the flush to the caller
    stock, ours = report.fsyncs_in_write_stock, report.after["fsyncs_in_write"]
    assert stock.ok and ours.ok, (stock, ours)
    assert stock.value[0] == 1 and ours.value[0] == 0
    assert ours.value[1] == stock.value[1]
