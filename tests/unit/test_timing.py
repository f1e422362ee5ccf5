"""PhaseTimer (host clock, device events, how phases add up), the communication timing the job
installs once, and the named sums of a global batch (columns of the one all-reduce)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_mimo.training import timing
from megatron_mimo.training.state import BatchSums
from megatron_mimo.training.timing import HOST_CLOCK, Clock, PhaseTimer, device_clock


@pytest.fixture
def host_ms(monkeypatch):
    """The host clock reads 0, 1, 2, ... ms, one tick per reading."""
    ticks = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks) / 1e3)


def test_host_clock_times_a_phase(host_ms):
    timer = PhaseTimer()
    with timer("data"):
        pass
    assert timer.read() == {"data": pytest.approx(1.0)}


def test_real_host_clock_gives_milliseconds():
    timer = PhaseTimer()
    with timer("work"):
        torch.ones(1)
    assert 0.0 <= timer.read()["work"] < 60e3


def test_repeated_phase_adds_up_and_nested_phases_count_their_own_time(host_ms):
    timer = PhaseTimer()
    with timer("forward"):  # ticks 0 -> 1
        pass
    with timer("grad_sync"):  # ticks 2 -> 7
        with timer("forward"):  # ticks 3 -> 6
            with timer("p2p"):  # ticks 4 -> 5
                pass
    assert timer.read() == pytest.approx({"forward": 1.0 + 3.0, "grad_sync": 5.0, "p2p": 1.0})


def test_remainder_gives_away_only_the_excluded_phases_inside_it(host_ms):
    timer = PhaseTimer()
    with timer("bridge"):  # ticks 0 -> 1, outside: not subtracted
        pass
    with timer.remainder("backward", excluding=("forward", "bridge")):  # ticks 2 -> 9
        with timer("forward"):  # 3 -> 4
            pass
        with timer("bridge"):  # 5 -> 6
            pass
        with timer("data"):  # 7 -> 8, not excluded
            pass
    ms = timer.read()
    assert ms == pytest.approx({"bridge": 2.0, "backward": 7.0 - 1.0 - 1.0, "forward": 1.0,
                                "data": 1.0})


def test_a_phase_that_raises_is_still_timed(host_ms):
    timer = PhaseTimer()
    with pytest.raises(RuntimeError), timer("optimizer"):
        raise RuntimeError("boom")
    assert timer.read() == {"optimizer": pytest.approx(1.0)}


def test_reset_forgets_the_last_step(host_ms):
    timer = PhaseTimer()
    with timer("data"):
        pass
    timer.reset()
    assert timer.read() == {}


class FakeEvent:
    """A device event: ``record`` stamps the stream's time, readable only once settled."""

    stream_ms = 0.0
    settled = False

    def __init__(self) -> None:
        self.at: float | None = None

    def record(self) -> None:
        FakeEvent.stream_ms += 10.0
        self.at = FakeEvent.stream_ms

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert FakeEvent.settled, "an event was read before the clock settled"
        return end.at - self.at


@pytest.fixture
def fake_device_clock(monkeypatch):
    monkeypatch.setattr(FakeEvent, "stream_ms", 0.0)
    monkeypatch.setattr(FakeEvent, "settled", False)
    settles = []

    def settle():
        settles.append(1)
        FakeEvent.settled = True

    return Clock(mark=FakeEvent, settle=settle), settles


def test_device_events_are_read_after_one_settle(fake_device_clock, monkeypatch):
    clock, settles = fake_device_clock
    monkeypatch.setattr(timing.time, "perf_counter", lambda: pytest.fail("host clock used"))
    timer = PhaseTimer(clock)
    with timer.remainder("backward", excluding=("forward",)):  # 10 -> 60
        with timer("forward"):  # 20 -> 30
            pass
        with timer("forward"):  # 40 -> 50
            pass
    assert settles == []  # nothing waits for the device while the step runs
    assert timer.read() == {"backward": 50.0 - 20.0, "forward": 20.0}
    assert settles == [1]


def test_device_clock_follows_the_device_type():
    assert device_clock(torch.device("cpu")) is HOST_CLOCK
    cuda = torch.device("cuda", 1)
    clock = device_clock(cuda)
    assert clock.mark.func is torch.cuda.Event and clock.mark.keywords == {"enable_timing": True}
    assert clock.settle.func is torch.cuda.synchronize and clock.settle.args == (cuda,)


class FakeComm:
    """Stands in for a bridge or P2P communicator: one call, one tick of the host clock."""

    def recv_forward(self):
        return "tensor"

    def send_backward(self, grad):
        return grad


def fake_communicator():
    bridge, p2p = FakeComm(), FakeComm()
    info = SimpleNamespace(p2p_communicator=p2p)
    return SimpleNamespace(bridge_comms=[bridge], rank_module_map={"language": info}), bridge, p2p


def test_communication_is_timed_once_installed(host_ms):
    from megatron_mimo.training.pipeline import time_communication

    communicator, bridge, p2p = fake_communicator()
    timer = PhaseTimer()
    time_communication(communicator, timer)
    for _ in range(2):  # two steps: no reinstalling in between
        timer.reset()
        assert bridge.recv_forward() == "tensor"
        assert p2p.send_backward("grad") == "grad"
        assert p2p.recv_forward() == "tensor"
        assert timer.read() == pytest.approx({"bridge": 1.0, "p2p": 2.0})


def test_communication_timing_refuses_a_second_install():
    from megatron_mimo.training.pipeline import time_communication

    communicator, _, _ = fake_communicator()
    time_communication(communicator, PhaseTimer())
    with pytest.raises(RuntimeError, match="timed already"):
        time_communication(communicator, PhaseTimer())


def test_batch_sums_columns_are_the_field_order():
    assert BatchSums.names() == ("loss_sum", "num_tokens", "correct", "answers", "audio_correct")
    assert [BatchSums.column(n) for n in BatchSums.names()] == [0, 1, 2, 3, 4]
    tensor = BatchSums(loss_sum=1.5, num_tokens=2.0, correct=3.0, answers=4.0,
                       audio_correct=5.0).to_tensor()
    assert tensor.tolist() == [1.5, 2.0, 3.0, 4.0, 5.0]
    assert tensor.dtype == torch.float32


def test_batch_sums_round_trip_through_fp32_is_exact():
    sums = BatchSums(loss_sum=0.1, num_tokens=248.0, correct=1.0, answers=8.0)
    once = BatchSums.from_tensor(sums.to_tensor())
    assert once.loss_sum == torch.tensor(0.1, dtype=torch.float32).item()
    assert BatchSums.from_tensor(once.to_tensor()) == once


def test_batch_sums_add_per_field():
    total = BatchSums() + BatchSums(1.0, 2.0, 3.0, 4.0) + BatchSums(0.5, 1.0, 0.0, 4.0)
    assert total == BatchSums(1.5, 3.0, 3.0, 8.0)


def test_reports_are_summed_per_named_column():
    from megatron_mimo.training.pipeline import sum_reported

    reported = [{"loss_sum": torch.tensor(2.0), "num_tokens": torch.tensor(3.0)},
                {"num_tokens": torch.tensor(4.0), "loss_sum": torch.tensor(1.0),
                 "answers": torch.tensor(2.0), "correct": torch.tensor(1.0)}]
    sums = BatchSums.from_tensor(sum_reported(reported, torch.device("cpu")))
    assert sums == BatchSums(loss_sum=3.0, num_tokens=7.0, correct=1.0, answers=2.0)
    with pytest.raises(ValueError):
        sum_reported([{"loss": torch.tensor(1.0)}], torch.device("cpu"))
