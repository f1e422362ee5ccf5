"""Device-independent megatron-core workarounds (compat/mcore.py), the version check, and the
RNG round trip of a checkpoint."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_mimo.compat.mcore import (
    ensure_adam_state,
    load_scheduler_state,
    rebuild_adam_steps,
)


def _wrapped(inner):
    return SimpleNamespace(optimizer=inner)


def test_ensure_adam_state_gives_zero_moments_and_own_steps():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = _wrapped(torch.optim.AdamW(params))
    ensure_adam_state(opt)
    states = [opt.optimizer.state[p] for p in params]
    assert all(s["step"].item() == 0 and s["exp_avg"].abs().sum() == 0 for s in states)
    assert states[0]["step"] is not states[1]["step"]


def test_rebuild_gives_each_parameter_its_own_step_from_the_group():
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(4)]
    inner = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(3)
    inner.step()
    shared = torch.tensor(5.0)  # what DistributedOptimizer's load leaves behind
    for p in params:
        inner.state[p]["step"] = shared
    inner.param_groups[0]["step"] = 5.0
    rebuild_adam_steps(_wrapped(inner))
    inner.step()
    assert [inner.state[p]["step"].item() for p in params] == [6.0] * 4  # shared would read 9


def test_helpers_leave_other_optimizers_alone():
    param = torch.nn.Parameter(torch.ones(2))
    opt = _wrapped(torch.optim.SGD([param], lr=0.1))
    ensure_adam_state(opt)
    rebuild_adam_steps(opt)
    assert len(opt.optimizer.state) == 0


def test_rng_capture_restore_round_trip(monkeypatch):
    from megatron_mimo.checkpoint import rng as ckpt_rng

    class Tracker:  # stand-in for megatron's tracker (no process group needed)
        states = {"model-parallel-rng": torch.Generator().manual_seed(3).get_state()}

        def get_states(self):
            return dict(self.states)

        def set_states(self, states):
            self.states = states

    tracker = Tracker()
    monkeypatch.setattr(ckpt_rng.mcore_random, "get_cuda_rng_tracker", lambda: tracker)
    saved = ckpt_rng.capture_rng()
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    ckpt_rng.restore_rng(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first


def _scheduler():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    holder = SimpleNamespace(param_groups=[{"params": [], "lr": 0.0, "weight_decay": 0.0}])
    return OptimizerParamScheduler(holder, init_lr=0.0, max_lr=1e-3, min_lr=1e-4,
                                   lr_warmup_steps=4, lr_decay_steps=10, lr_decay_style="cosine",
                                   start_wd=0.0, end_wd=0.0, wd_incr_steps=10,
                                   wd_incr_style="constant")


def test_scheduler_load_counts_the_saved_steps_once():
    saved = _scheduler()
    saved.step(increment=3)
    stepped = _scheduler()
    stepped.step(increment=2)  # a scheduler object that already advanced (e.g. probed, reused)
    plain = _scheduler()
    plain.step(increment=2)
    plain.load_state_dict(saved.state_dict())
    assert plain.num_steps == 5  # megatron-core adds: the bug the workaround exists for
    load_scheduler_state(stepped, saved.state_dict())
    assert stepped.num_steps == 3
    assert stepped.get_lr(stepped.optimizer.param_groups[0]) == saved.get_lr(saved.optimizer.param_groups[0])


def test_unverified_megatron_core_version_names_every_workaround():
    from megatron_mimo.compat import ALL_WORKAROUNDS
    from megatron_mimo.compat.registry import unverified_warning

    assert unverified_warning("0.19.2", ALL_WORKAROUNDS) is None
    assert unverified_warning("0.19.2+e35eddc", ALL_WORKAROUNDS) is None  # git-checkout suffix
    warning = unverified_warning("0.20.0", ALL_WORKAROUNDS)
    assert warning.startswith("megatron-core 0.20.0 is not a version")
    assert all(w.name in warning for w in ALL_WORKAROUNDS)


def test_every_workaround_is_recorded_on_its_function_under_its_name():
    import megatron_mimo.compat.checkpointing as checkpointing_module
    import megatron_mimo.compat.cpu as cpu_module
    import megatron_mimo.compat.mcore as mcore_module
    from megatron_mimo.compat import ALL_WORKAROUNDS
    from megatron_mimo.compat.registry import NOT_REPORTED

    assert len(ALL_WORKAROUNDS) == 21
    for record in ALL_WORKAROUNDS:
        function = (getattr(cpu_module, record.name, None) or getattr(mcore_module, record.name, None)
                    or getattr(checkpointing_module, record.name))
        assert function.workaround is record
        assert record.trigger and record.remove_when
        assert record.upstream == NOT_REPORTED or record.upstream.startswith("https://")
        assert (record.apply is function) == (record.apply is not None)
    assert {w.name for w in ALL_WORKAROUNDS if w.cpu} == {
        "current_device_is_cpu", "cuda_streams_are_noops", "cuda_literals_to_cpu",
        "bridge_groups_use_default_backend", "cpu_rng_tracker", "no_torch_compile"}


def test_a_name_is_registered_once(monkeypatch):
    from megatron_mimo.compat import registry

    monkeypatch.setattr(registry, "REGISTRY", {})

    def twin() -> None:
        """A workaround."""

    registry.workaround(trigger="t", remove_when="r")(twin)
    with pytest.raises(ValueError, match="'twin' is registered twice"):
        registry.workaround(trigger="t", remove_when="r")(twin)


def test_gpu_processes_get_no_cpu_workaround():
    from megatron_mimo.compat import process_workarounds

    on_gpu = {w.name for w in process_workarounds(cpu=False)}
    on_cpu = {w.name for w in process_workarounds(cpu=True)}
    assert on_gpu == {"in_process_save_queue", "global_memory_buffer",
                      "hybrid_final_norm_is_local", "fully_reshardable_load_keeps_adam_step"}
    assert on_cpu - on_gpu == {"current_device_is_cpu", "cuda_streams_are_noops",
                               "cuda_literals_to_cpu", "bridge_groups_use_default_backend",
                               "cpu_rng_tracker", "no_torch_compile"}


def test_process_workarounds_apply_only_when_triggered(monkeypatch):
    from megatron_mimo.compat import registry

    calls = []
    monkeypatch.setattr(registry, "_APPLIED", set())
    idle = registry.Workaround("idle", "never", registry.NOT_REPORTED, "-",
                               lambda: calls.append("idle"), lambda: False)
    busy = registry.Workaround("busy", "always", registry.NOT_REPORTED, "-",
                               lambda: calls.append("busy"))
    assert registry.apply_all([idle, busy]) == ["busy"]
    assert registry.apply_all([idle, busy]) == []  # idempotent
    assert calls == ["busy"]
