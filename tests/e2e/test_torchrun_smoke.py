"""The README's main job, end to end: torchrun + the example script on the tiny preset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

pytestmark = pytest.mark.dist


def test_tiny_cpu_trains_with_eval_and_one_reporting_rank(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "4",
           "examples/pretrain_hetero_mimo.py", "--config", "tiny_cpu", "--train-iters", "4",
           "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "2",
           "--metrics-file", str(metrics)]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["iteration"] for x in train] == [1, 2, 3, 4]
    assert [x["consumed_samples"] for x in train] == [8, 16, 24, 32]
    assert [x["iteration"] for x in evals] == [2, 4]
    assert all(0 < x["eval_loss"] < 10 for x in evals)
    assert set(train[0]["lr"]) == {"images", "language"}
    log_lines = [x for x in proc.stdout.splitlines() if "| lm loss:" in x]
    assert len(log_lines) == 3  # iterations 1, 2, 4 (first + every --log-interval)
    assert all("[rank 2 language]" in x for x in log_lines)  # one reporting rank
    assert "Traceback" not in proc.stderr
