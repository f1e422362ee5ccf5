"""StopRequests: signals set a flag once, later ones are ignored; the time budget counts."""

import os
import signal
import time

import pytest

from megatron_mimo.training.stopping import StopRequests


@pytest.fixture
def watch():
    w = StopRequests().install()
    yield w
    w.uninstall()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_reason_and_does_not_kill(watch, sig):
    assert watch.local_reason() is None
    os.kill(os.getpid(), sig)
    assert watch.local_reason() == f"signal {sig.name}"


def test_second_signal_is_ignored(watch, caplog):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert watch.signal_name == "SIGTERM"
    assert "ignored" in caplog.text


def test_uninstall_restores_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    w = StopRequests().install()
    assert signal.getsignal(signal.SIGUSR1) != before
    w.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_time_budget():
    assert StopRequests(exit_duration_s=3600).local_reason() is None
    expired = StopRequests(exit_duration_s=0.5, start=time.monotonic() - 1)
    assert "exit-duration-in-mins" in expired.local_reason()
