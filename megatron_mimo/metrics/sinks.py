"""Metric sinks of the reporting rank: Megatron-style log line, JSON lines, TensorBoard."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_mimo.training.state import EvalResult

logger = logging.getLogger(__name__)


def format_log_line(record: dict[str, Any], train_iters: int) -> str:
    """One line in Megatron's style: iteration/total, samples, LR per branch, loss, norm, speed."""
    parts = [f"iteration {record['iteration']:8d}/{train_iters:8d}",
             f"consumed samples: {record['consumed_samples']:12d}",
             f"elapsed time per iteration (ms): {record['ms_per_iteration']:.1f}"]
    parts += [f"learning rate ({branch}): {lr:.6E}" for branch, lr in record["lr"].items()]
    parts.append(f"lm loss: {record['loss']:.6E}")
    if record.get("loss_scale", 1.0) != 1.0:
        parts.append(f"loss scale: {record['loss_scale']:.1f}")
    if record["grad_norm"] is not None:
        parts.append(f"grad norm: {record['grad_norm']:.3f}")
    parts.append(f"tokens/s: {record['tokens_per_s']:.0f}")
    parts.append(f"number of skipped iterations: {record['skipped_iterations']:3d}")
    return " | ".join(parts) + " |"


@dataclass
class MetricSinks:
    """Where the reporting rank sends metrics. Other ranks get a sink set with nothing in it."""

    active: bool
    train_iters: int
    jsonl: Path | None = None
    tensorboard_dir: str | None = None
    _writer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.active:
            return
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        if self.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError("--tensorboard-dir needs tensorboard: pip install "
                                   "'megatron-mimo[tb]'") from error
            self._writer = SummaryWriter(self.tensorboard_dir)

    def record(self, record: dict[str, Any], print_line: bool) -> None:
        """Write one iteration's metrics; print the log line when ``print_line``."""
        if not self.active:
            return
        if print_line:
            logger.info(format_log_line(record, self.train_iters))
        if self.jsonl is not None:
            with self.jsonl.open("a") as out:
                out.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = record["iteration"]
            self._writer.add_scalar("lm loss", record["loss"], step)
            if record["grad_norm"] is not None:
                self._writer.add_scalar("grad-norm", record["grad_norm"], step)
            for branch, lr in record["lr"].items():
                self._writer.add_scalar(f"learning-rate/{branch}", lr, step)
            self._writer.add_scalar("tokens-per-second", record["tokens_per_s"], step)

    def record_eval(self, iteration: int, result: EvalResult) -> None:
        """Write one evaluation result: held-out loss and answer accuracy (and the clip's
        answer accuracy with an audio branch)."""
        if not self.active:
            return
        audio = result.audio_accuracy
        logger.info("validation loss at iteration %d | lm loss value: %.6E | accuracy: %.2f %% |%s",
                    iteration, result.loss, 100.0 * result.accuracy,
                    "" if audio is None else f" audio accuracy: {100.0 * audio:.2f} % |")
        scalars = {"lm loss validation": result.loss, "accuracy validation": result.accuracy}
        record = {"iteration": iteration, "eval_loss": result.loss,
                  "eval_accuracy": result.accuracy}
        if audio is not None:
            scalars["audio accuracy validation"] = audio
            record["eval_audio_accuracy"] = audio
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, iteration)
        if self.jsonl is not None:
            with self.jsonl.open("a") as out:
                out.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._writer is not None:
            self._writer.close()
