"""SIGTERM to torchrun mid-run: every rank stops after the same iteration, saves, exits 75,
and the next run resumes from that iteration."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

pytestmark = pytest.mark.dist


def _torchrun(args, env):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "4", "examples/pretrain_hetero_mimo.py",
           "--config", "tiny_cpu", *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigterm_stops_all_ranks_at_one_iteration_and_saves(tmp_path):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    proc = _torchrun(["--train-iters", "500", "--save", str(ckpt), "--load", str(ckpt),
                      "--metrics-file", str(metrics)], env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    trained = [json.loads(x)["iteration"] for x in metrics.read_text().splitlines()]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved == trained[-1] < 500
    assert out.count("stopping at iteration") == 4, out[-3000:]
    assert len(set(x.split("stopping at iteration ")[1].split(":")[0]
                   for x in out.splitlines() if "stopping at iteration" in x)) == 1
    assert "exitcode  : 75" in out or "exit code 75" in out
    resumed = _torchrun(["--train-iters", str(saved + 1), "--save", str(ckpt), "--load", str(ckpt),
                         "--metrics-file", str(metrics)], env)
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resuming at iteration {saved}" in out
    assert json.loads(metrics.read_text().splitlines()[-1])["iteration"] == saved + 1
