"""Spawn small gloo worlds for tests: one subprocess per rank, results back as JSON.

Each rank runs ``python -m <module> <args-json> <result-path>``; a worker module calls
:func:`tests.workers.common.worker_main`. On a timeout or a failing rank every process is killed
and the assertion message carries the tail of each rank's log.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.workers.contract import decode

REPO_ROOT = Path(__file__).resolve().parent.parent


PORTS_PER_WORKER = 2000
_next_port = itertools.count(random.randrange(PORTS_PER_WORKER))


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (where bind-to-0 and outgoing
    connections draw from)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems: a port below it is as good


def free_port() -> int:
    """A rendezvous port that no other process takes before rank 0 binds it: below the
    ephemeral range, where the gloo connections of worlds running in parallel (pytest-xdist)
    cannot land on it, in a block of its own per pytest worker; free when checked."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    top = ephemeral_low() - worker * PORTS_PER_WORKER
    for _ in range(PORTS_PER_WORKER):
        port = top - 1 - next(_next_port) % PORTS_PER_WORKER
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT from an earlier world
                continue
            return port
    raise RuntimeError(f"no free port in {top - PORTS_PER_WORKER}-{top - 1}")


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def run_world(module: str, world_size: int, args: dict[str, Any] | None = None,
              timeout: float = 240.0, extra_env: dict[str, str] | None = None) -> list[Any]:
    """Run ``module`` on ``world_size`` ranks; return each rank's result (rebuilt dataclasses,
    :mod:`tests.workers.contract`), rank order."""
    with tempfile.TemporaryDirectory(prefix="mimo-world-") as tmp:
        tmpdir = Path(tmp)
        base_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                    "WORLD_SIZE": str(world_size), "TORCHDYNAMO_DISABLE": "1",
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(extra_env or {})}
        procs, logs = [], []
        for rank in range(world_size):
            env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(world_size)}
            log = tmpdir / f"rank{rank}.log"
            logs.append(log)
            cmd = [sys.executable, "-m", module, json.dumps(args or {}), str(tmpdir / f"rank{rank}.json")]
            procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log.open("w"),
                                          stderr=subprocess.STDOUT))
        _wait_all(procs, logs, timeout, module)
        return [decode(json.loads((tmpdir / f"rank{r}.json").read_text()))
                for r in range(world_size)]


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float, module: str) -> None:
    deadline = time.monotonic() + timeout
    failed = None
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            failed = f"rank(s) {bad} exited with {[codes[r] for r in bad]}"
            time.sleep(2.0)  # let peers print their side of the failure
            break
        time.sleep(0.2)
    else:
        failed = f"timed out after {timeout:.0f} s"
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
    report = "\n".join(f"--- rank {r} ---\n{_tail(log)}" for r, log in enumerate(logs))
    raise AssertionError(f"{module}: {failed}\n{report}")
