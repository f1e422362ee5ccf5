"""The CPU side of ``finetune-load``: a tiny checkpoint written by the Trainer on two CPU ranks (the
branches need disjoint ranks), and each branch's output on the fixed input, as a CPU-only machine
computes them.

:func:`save_on_cpu` runs this module under ``torch.distributed.run`` with no GPU visible; each
rank first hides transformer-engine, mamba-ssm and the other CUDA-only packages (an entry of None
in ``sys.modules`` makes ``import`` fail and ``importlib.util.find_spec`` answer None, exactly as
when they are not installed), so megatron-core builds the same modules a CPU-only install does.
A rehearsal runs ``megatron-mimo --finetune`` the same way. Only the standard library is
imported at module level: the hiding must precede megatron-core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HIDDEN_PACKAGES = ("transformer_engine", "transformer_engine_torch", "mamba_ssm",
                   "causal_conv1d", "apex", "flash_attn")
"""CUDA-only packages megatron-core uses when they import."""

SAVE_TIMEOUT_S = 900


@dataclass(frozen=True)
class CpuCheckpoint:
    """What the CPU save left under ``root``: the checkpoint and each side's reference output."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        """The Trainer's ``--save`` directory."""
        return self.root / "ckpt"

    def reference(self, side: str) -> Path:
        """The side's output on the fixed input, computed on the CPU after the save."""
        return self.root / f"reference-{side}.pt"


def torchrun(nproc: int, module: str, args: list[str]) -> list[str]:
    """Command line of ``module`` on ``nproc`` local ranks (torch's launcher, this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", module, *args]


def run_logged(command: list[str], env: dict[str, str], log: Path, timeout_s: float) -> None:
    """Run ``command`` with its output appended to ``log``; raise with the log's last line on a
    non-zero exit or a timeout."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        try:
            code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{command[-1]!r}: timed out after {timeout_s:.0f} s") from None
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise RuntimeError(f"exit code {code}: {lines[-1][:200] if lines else 'no output'}")


def save_on_cpu(preset: str, root: Path, log: Path, base_env: dict[str, str]) -> CpuCheckpoint:
    """Train ``preset`` one iteration on 2 CPU ranks, save it, write the references."""
    saved = CpuCheckpoint(root)
    root.mkdir(parents=True, exist_ok=True)
    env = {**base_env, "CUDA_VISIBLE_DEVICES": "", "MIMO_DEVICE": "cpu",
           "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    run_logged(cpu_only_torchrun({"preset": preset, "root": str(root)}), env, log,
               SAVE_TIMEOUT_S)
    return saved


def cpu_only_torchrun(request: dict) -> list[str]:
    """Command line of this module on 2 ranks: ``{"preset", "root"}`` runs :func:`worker`,
    ``{"main": argv}`` the ``megatron-mimo`` command, each as a CPU-only install would."""
    return torchrun(2, __name__, [json.dumps(request)])


def hide_gpu_packages() -> None:
    """Make the CUDA-only packages look not installed in this process."""
    for name in HIDDEN_PACKAGES:
        sys.modules[name] = None  # type: ignore[assignment]


def worker(preset: str, root: Path) -> None:
    """One rank of the CPU save (after :func:`hide_gpu_packages`)."""
    from megatron_mimo.metrics.log import quiet_third_party

    quiet_third_party("WARNING")
    import torch

    from megatron_mimo.config.cli import config_from_args
    from megatron_mimo.gpu_check.builds import TWO_RANK_FLAGS, evaluate_side
    from megatron_mimo.training.trainer import started_trainer

    saved = CpuCheckpoint(root)
    # no warmup: the one iteration runs at the peak learning rate, so the saved weights are
    # not the initial ones (a load that does nothing cannot pass for one)
    cfg, _ = config_from_args(["--config", preset, *TWO_RANK_FLAGS, "--train-iters", "1",
                               "--lr-warmup-iters", "0", "--save", str(saved.checkpoints),
                               "--log-level", "WARNING"])
    with started_trainer(cfg) as trainer:
        trainer.step()
        trainer.save()
        module = trainer.job.branch_ddp.module  # fp32: DDP wraps the branch itself
        output = evaluate_side(module, cfg, trainer.branch, trainer.job.runtime.device)
        torch.save(output, saved.reference(trainer.branch))


if __name__ == "__main__":
    hide_gpu_packages()
    os.environ["MIMO_DEVICE"] = "cpu"
    _request = json.loads(sys.argv[1])
    if "main" in _request:
        from megatron_mimo.main import main

        sys.exit(main(_request["main"]))
    worker(_request["preset"], Path(_request["root"]))
