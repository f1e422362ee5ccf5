"""The README's main job end to end (torchrun + the example script on the tiny preset): it trains
with evaluation and one reporting rank; SIGTERM to torchrun mid-run stops every rank after the
same iteration, saves, exits 75, and the next run resumes from that iteration. One run serves
both (a torchrun start costs ~15 s here)."""

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
LOGGED = ["--eval-interval", "2", "--eval-iters", "1", "--log-interval", "2"]


def _torchrun(args, env):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "4", "examples/pretrain_hetero_mimo.py",
           "--config", "tiny_cpu", *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _check_first_four_iterations(lines: list[dict], stdout: str) -> None:
    """Records, evaluations and log lines of iterations 1-4 (global batch 8, eval every 2)."""
    train = [x for x in lines if "loss" in x][:4]
    evals = [x for x in lines if "eval_loss" in x][:2]
    assert [x["iteration"] for x in train] == [1, 2, 3, 4]
    assert [x["consumed_samples"] for x in train] == [8, 16, 24, 32]
    assert [x["iteration"] for x in evals] == [2, 4]
    assert all(0 < x["eval_loss"] < 10 for x in evals)
    assert set(train[0]["lr"]) == {"images", "language"}
    log_lines = [x for x in stdout.splitlines() if "| lm loss:" in x]
    assert log_lines[:3] and all("[rank 2 language]" in x for x in log_lines)  # one reporting rank
    assert [int(x.split("iteration")[1].split("/")[0]) for x in log_lines[:3]] == [1, 2, 4]


def test_trains_then_sigterm_stops_all_ranks_at_one_iteration_and_saves(tmp_path):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    proc = _torchrun(["--train-iters", "500", "--save", str(ckpt), "--load", str(ckpt),
                      "--metrics-file", str(metrics), *LOGGED], env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (  # until the evaluation at iteration 4 is written
            not metrics.exists() or metrics.read_text().count('"eval_loss"') < 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:] + proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    _check_first_four_iterations(records, out)
    trained = [x["iteration"] for x in records if "loss" in x]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved == trained[-1] < 500
    both = out + err
    assert both.count("stopping at iteration") == 4, both[-3000:]
    assert len(set(x.split("stopping at iteration ")[1].split(":")[0]
                   for x in both.splitlines() if "stopping at iteration" in x)) == 1
    assert "exitcode  : 75" in both or "exit code 75" in both
    resumed = _torchrun(["--train-iters", str(saved + 1), "--save", str(ckpt), "--load", str(ckpt),
                         "--metrics-file", str(metrics)], env)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, (out + err)[-3000:]
    assert "Traceback" not in err, err[-3000:]  # a run that ends normally prints none
    assert f"resuming at iteration {saved}" in out + err
    assert json.loads(metrics.read_text().splitlines()[-1])["iteration"] == saved + 1
