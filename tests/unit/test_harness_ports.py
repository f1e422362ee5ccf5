"""The test worlds' rendezvous ports: two pytest workers spawn worlds at once, and a port found
free inside the kernel's ephemeral range can be taken by another world's gloo connection before
rank 0 binds it (EADDRINUSE at init_process_group)."""

import socket

from tests.harness import PORTS_PER_WORKER, ephemeral_low, free_port


def test_ports_are_below_the_ephemeral_range_in_a_block_per_worker(monkeypatch):
    low = ephemeral_low()
    for worker, block in (("gw0", 0), ("gw1", 1), (None, 0)):
        if worker is None:
            monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
        else:
            monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        ports = {free_port() for _ in range(20)}
        top = low - block * PORTS_PER_WORKER
        assert all(top - PORTS_PER_WORKER <= port < top for port in ports), (worker, ports)
        assert len(ports) == 20  # successive worlds get successive ports


def test_a_port_in_use_is_skipped(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    first = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first + 1 if first + 1 < ephemeral_low() else first - 1))
        taken = held.getsockname()[1]
        assert all(free_port() != taken for _ in range(3 * PORTS_PER_WORKER // 2))
