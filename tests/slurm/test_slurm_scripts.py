"""The Slurm scripts without a cluster: syntax, and the commands they would run (DRY_RUN=1)
for faked allocations."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

SBATCH = REPO_ROOT / "slurm" / "train_hetero.sbatch"
CHAIN = REPO_ROOT / "slurm" / "chain.sh"
TWO_STAGE = REPO_ROOT / "slurm" / "llava_two_stage.sh"
SCRIPTS = [SBATCH, CHAIN, TWO_STAGE, REPO_ROOT / "examples" / "llava_two_stage.sh",
           *sorted((REPO_ROOT / "tests" / "slurm").glob("*.sh"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _fake_bin(tmp_path: Path, scontrol: str) -> Path:
    """A PATH directory whose `scontrol` is a stub (no cluster needed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "scontrol"
    stub.write_text("#!/bin/sh\n" + scontrol + "\n")
    stub.chmod(0o755)
    return bin_dir


def _render(tmp_path: Path, scontrol: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = _fake_bin(tmp_path, scontrol)
    base = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp_path),
            "DRY_RUN": "1", "MIMO_ROOT": str(REPO_ROOT), "JOB_DIR": str(tmp_path / "job")}
    return subprocess.run(["bash", str(SBATCH)], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


def _torchrun_args(cmd: list[str]) -> dict[str, str]:
    start = next(i for i, w in enumerate(cmd) if w.endswith("/torchrun"))
    script = next(i for i, w in enumerate(cmd) if w.endswith("pretrain_hetero_mimo.py"))
    words = cmd[start + 1:script]
    return dict(zip(words[::2], words[1::2], strict=True))


TWO_NODES = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NAME": "mimo-hetero"}


@pytest.mark.parametrize("scontrol", [
    'printf "gpu07\\ngpu08\\n"',   # the real expansion
    "exit 1",                       # scontrol unusable: the script's own expansion
], ids=["scontrol", "fallback"])
def test_two_node_command_line(tmp_path, scontrol):
    proc = _render(tmp_path, scontrol, **TWO_NODES, TRAIN_ARGS="--seed 7 --log-interval 5",
                   TRAIN_ITERS="30", MASTER_PORT="29411")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmd = shlex.split(proc.stdout.strip())
    assert cmd[0] == "srun"
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1"} <= set(cmd)
    assert f"--output={tmp_path}/job/logs/train-4242-r0.log" in cmd
    guard = cmd.index("node-guard")
    assert cmd[guard - 3:guard] == ["bash", "-c", "$NODE_GUARD"]
    assert cmd[guard + 1] == str(REPO_ROOT / ".venv" / "bin" / "torchrun")
    tr = _torchrun_args(cmd)
    assert tr["--nnodes"] == "2"
    assert tr["--nproc-per-node"] == "2"  # tiny_cpu's world size 4 over 2 nodes
    assert tr["--rdzv-backend"] == "c10d"
    assert tr["--rdzv-endpoint"] == "gpu07:29411"  # the first node
    assert tr["--rdzv-id"] == "4242"
    train = cmd[cmd.index(str(REPO_ROOT / "examples" / "pretrain_hetero_mimo.py")) + 1:]
    job_dir = str(tmp_path / "job")
    assert train[:2] == ["--config", "tiny_cpu"]
    assert train[train.index("--save") + 1] == job_dir
    assert train[train.index("--load") + 1] == job_dir
    assert train[train.index("--metrics-file") + 1] == f"{job_dir}/metrics.jsonl"
    assert train[-6:] == ["--seed", "7", "--log-interval", "5", "--train-iters", "30"]


def test_restart_changes_log_and_port(tmp_path):
    first = shlex.split(_render(tmp_path, "exit 1", **TWO_NODES).stdout)
    again = shlex.split(_render(tmp_path, "exit 1", **TWO_NODES, SLURM_RESTART_COUNT="1").stdout)
    assert f"--output={tmp_path}/job/logs/train-4242-r1.log" in again
    assert _torchrun_args(first)["--rdzv-endpoint"] != _torchrun_args(again)["--rdzv-endpoint"]


def test_gpus_on_node_set_nproc_per_node(tmp_path):
    proc = _render(tmp_path, 'printf "n1\\n"', SLURM_JOB_ID="9", SLURM_JOB_NODELIST="n1",
                   SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="8", CONFIG="llava_8gpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tr = _torchrun_args(shlex.split(proc.stdout))
    assert (tr["--nnodes"], tr["--nproc-per-node"]) == ("1", "8")
    assert tr["--rdzv-endpoint"].startswith("n1:")


def test_allocation_that_does_not_fit_the_config_is_refused(tmp_path):
    proc = _render(tmp_path, "exit 1", **TWO_NODES, NPROC_PER_NODE="4")
    assert proc.returncode == 2
    assert "needs world size 4" in proc.stdout
    assert "2 node(s) x 4 = 8" in proc.stdout


def test_chain_queues_dependent_jobs(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "JOB_DIR": str(tmp_path / "job")}
    proc = subprocess.run(["bash", str(CHAIN), "3", "-t", "00:30:00"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert len(calls) == 3
    assert all(c[0] == "sbatch" and c[-3:] == ["-t", "00:30:00", str(SBATCH)] for c in calls)
    deps = [[w for w in c if w.startswith("--dependency=")] for c in calls]
    assert deps == [[], ["--dependency=afterany:DRYRUN1"], ["--dependency=afterany:DRYRUN2"]]
    assert (tmp_path / "job").is_dir()


def test_two_stages_queue_stage_two_after_stage_one_succeeded():
    """Stage 1: captions, projector only, from the import; stage 2: VQA with the LLM, from
    stage 1's weights, after stage 1 succeeded."""
    env = {**os.environ, "DRY_RUN": "1", "PRETRAINED": "/ck/import", "CAPTIONS": "/d/cap",
           "VQA": "/d/vqa", "OUT": "/runs/llava"}
    proc = subprocess.run(["bash", str(TWO_STAGE), "-N", "1"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    one, two = proc.stderr.strip().splitlines()
    assert "JOB_DIR=/runs/llava/stage1" in one and "JOB_DIR=/runs/llava/stage2" in two
    assert ("--data-path /d/cap --pretrained-checkpoint /ck/import --freeze-vit --freeze-lm "
            "--tokenizer-model /ck/import/hf") in one
    assert ("--data-path /d/vqa --pretrained-checkpoint /runs/llava/stage1 --freeze-vit "
            "--tokenizer-model /ck/import/hf") in two
    assert "--dependency" not in one and "--dependency=afterok:<stage1>" in two
