"""slurm/train_hetero.sbatch on a real one-node Slurm: preempt twice, requeue, resume, and end
with the same per-iteration loss / grad norm / LR as an uninterrupted torchrun run, bit for bit.

The module fixture starts slurmctld + slurmd + munged with tests/slurm/start_cluster.sh
(installing the Debian packages when missing); where that cannot work (not root, no apt-get)
the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
CLUSTER_DIR = Path(os.environ.get("MIMO_SLURM_TEST_DIR", "/tmp/mimo-slurm"))
TRAIN_ITERS = 20
COMPARED = ("iteration", "consumed_samples", "loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def slurm_env():
    """Environment for Slurm client calls against the test cluster (started if needed)."""
    proc = subprocess.run(["bash", str(HERE / "start_cluster.sh"), str(CLUSTER_DIR)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"no Slurm test cluster (start_cluster.sh exit {proc.returncode}): "
                    + proc.stderr.strip()[-1500:])
    reused = "reusing the running cluster" in proc.stderr
    env = {**os.environ, "SLURM_CONF": str(CLUSTER_DIR / "etc" / "slurm.conf"),
           "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    yield env
    if not reused:
        subprocess.run(["bash", str(HERE / "stop_cluster.sh"), str(CLUSTER_DIR)],
                       capture_output=True, timeout=120)


def _records(path: Path, partial: bool = False) -> dict[int, dict]:
    """Training records by iteration; a resumed run's record replaces an earlier one.
    ``partial``: the file may be mid-write (skip an incomplete last line)."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if partial:
                continue
            raise
        if "loss" in rec:
            out[rec["iteration"]] = {k: rec[k] for k in COMPARED}
    return out


def _reference(tmp_path: Path) -> dict[int, dict]:
    """The uninterrupted run: plain torchrun, outside Slurm, same training flags."""
    ckpt, metrics = tmp_path / "ref", tmp_path / "ref.jsonl"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "4", "examples/pretrain_hetero_mimo.py",
           "--config", "tiny_cpu", "--train-iters", str(TRAIN_ITERS), "--save", str(ckpt),
           "--load", str(ckpt), "--metrics-file", str(metrics)]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _records(metrics)


class Job:
    """One `sbatch --wait` submission of slurm/train_hetero.sbatch, watched from outside."""

    def __init__(self, env: dict, job_dir: Path):
        self.env, self.job_dir = env, job_dir
        self.name = f"mimo-test-{uuid.uuid4().hex[:8]}"
        self.metrics = job_dir / "metrics.jsonl"
        job_env = {**env, "JOB_DIR": str(job_dir), "TRAIN_ITERS": str(TRAIN_ITERS),
                   "MIMO_ROOT": str(REPO_ROOT)}
        self.proc = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", f"--job-name={self.name}",
             f"--output={job_dir}/slurm-%j.out", str(REPO_ROOT / "slurm" / "train_hetero.sbatch")],
            cwd=REPO_ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.id = self._wait(self._lookup_id, 120, "the job id")

    def _lookup_id(self) -> str | None:
        out = self._slurm("squeue", "-h", "-n", self.name, "-o", "%i")
        return out.strip() or None

    def _slurm(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=60).stdout

    def output(self) -> str:
        files = sorted(self.job_dir.glob("slurm-*.out"))
        return files[0].read_text(errors="replace") if files else ""

    def _wait(self, probe, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"sbatch exited ({self.proc.returncode}) while waiting for "
                                     f"{what}: {self.proc.stderr.read()}\n{self.output()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.output()[-3000:]}\n"
                             + self._slurm("squeue"))

    def wait_for_iteration(self, iteration: int) -> None:
        self._wait(lambda: max(_records(self.metrics, partial=True), default=0) >= iteration, 600,
                   f"iteration {iteration} in {self.metrics}")

    def wait_for_output(self, text: str) -> None:
        self._wait(lambda: text in self.output(), 600, repr(text))

    def signal(self, *flags: str) -> None:
        subprocess.run(["scancel", *flags, "--signal=TERM", self.id], env=self.env, check=True,
                       timeout=60)

    def finish(self) -> int:
        try:
            self.proc.wait(timeout=900)
        finally:
            if self.proc.poll() is None:
                self.cancel()
                self.proc.kill()
        return self.proc.returncode

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, timeout=60)


@pytest.mark.timeout(1800)
def test_preempted_twice_requeued_and_bit_exact(slurm_env, tmp_path):
    reference = _reference(tmp_path)
    assert sorted(reference) == list(range(1, TRAIN_ITERS + 1))

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    job = Job(slurm_env, job_dir)
    try:
        # 1) TERM to the batch shell only (like --signal=B:TERM@...), twice: the trap forwards
        #    the first to torchrun through the job step and ignores the second.
        job.wait_for_iteration(4)
        job.signal("--batch")
        job.signal("--batch")
        job.wait_for_output("restart 1:")
        first_stop = int((job_dir / "latest_checkpointed_iteration.txt").read_text())
        assert 4 <= first_stop < TRAIN_ITERS
        # 2) TERM to the job step only (plain `scancel --signal`): the batch shell sees no signal
        #    and requeues because the step saved a newer checkpoint.
        job.wait_for_iteration(first_stop + 4)
        job.signal()
        job.wait_for_output("restart 2:")
        rc = job.finish()
    finally:
        if job.proc.poll() is None:
            job.cancel()
            job.proc.kill()
    out = job.output()
    assert rc == 0, f"sbatch --wait exit {rc}\n{out[-4000:]}"

    assert out.count("received SIGTERM: forwarding") == 1, out
    assert "received SIGTERM again: ignored" in out, out
    assert out.count(f"requeued job {job.id}") == 2, out
    assert "training finished" in out, out
    assert int((job_dir / "latest_checkpointed_iteration.txt").read_text()) == TRAIN_ITERS
    stops = sorted(int(p.name.split("_")[1]) for p in job_dir.glob("iter_*"))
    assert len(stops) == 3 and stops[0] == first_stop < stops[1] < stops[2] == TRAIN_ITERS, stops
    logs = job_dir / "logs"
    run0 = (logs / f"train-{job.id}-r0.log").read_text(errors="replace")
    run1 = (logs / f"train-{job.id}-r1.log").read_text(errors="replace")
    run2 = (logs / f"train-{job.id}-r2.log").read_text(errors="replace")
    assert run0.count(f"stopping at iteration {first_stop}:") == 4
    assert run1.count(f"resuming at iteration {first_stop} ") == 4
    assert run1.count(f"stopping at iteration {stops[1]}:") == 4
    assert run2.count(f"resuming at iteration {stops[1]} ") == 4

    resumed = _records(job.metrics)
    assert sorted(resumed) == list(range(1, TRAIN_ITERS + 1))
    for it in range(1, TRAIN_ITERS + 1):
        assert resumed[it] == reference[it], f"iteration {it}: {resumed[it]} != {reference[it]}"
