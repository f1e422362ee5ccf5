"""Optimizer-state helpers that guard against megatron-core's torch-Adam resume bugs."""

import random
from types import SimpleNamespace

import numpy as np
import torch

from megatron_mimo.ckpt_state import ensure_adam_state, rebuild_adam_steps


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
    shared = torch.tensor(5.0)  # what distrib_optimizer.py:1049-1051 leaves behind
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
    from megatron_mimo import ckpt_state

    class Tracker:  # stand-in for megatron's tracker (no process group needed)
        states = {"model-parallel-rng": torch.Generator().manual_seed(3).get_state()}

        def get_states(self):
            return dict(self.states)

        def set_states(self, states):
            self.states = states

    tracker = Tracker()
    monkeypatch.setattr(ckpt_state.mcore_random, "get_cuda_rng_tracker", lambda: tracker)
    saved = ckpt_state.capture_rng()
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    ckpt_state.restore_rng(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first
