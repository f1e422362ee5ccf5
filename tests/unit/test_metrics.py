"""Log line format and metric sinks."""

import importlib.util
import json
import logging

import pytest

from megatron_mimo.metrics.sinks import MetricSinks, format_log_line
from megatron_mimo.training.state import EvalResult

RECORD = {"iteration": 10, "consumed_samples": 80, "ms_per_iteration": 250.0,
          "lr": {"images": 1e-3, "language": 3e-3}, "loss": 4.2, "grad_norm": 1.5,
          "tokens_per_s": 1200.0, "skipped_iterations": 0}


def test_log_line_has_megatron_fields():
    line = format_log_line(RECORD, train_iters=40)
    for text in ("iteration       10/      40", "consumed samples:           80",
                 "elapsed time per iteration (ms): 250.0", "learning rate (images): 1.000000E-03",
                 "learning rate (language): 3.000000E-03", "lm loss: 4.200000E+00",
                 "grad norm: 1.500", "tokens/s: 1200", "number of skipped iterations:   0"):
        assert text in line


def test_skipped_step_has_no_grad_norm():
    assert "grad norm" not in format_log_line({**RECORD, "grad_norm": None}, 40)


def test_jsonl_sink_round_trips_floats_exactly(tmp_path, caplog):
    path = tmp_path / "m" / "metrics.jsonl"
    sinks = MetricSinks(active=True, train_iters=40, jsonl=path)
    record = {**RECORD, "loss": 0.1 + 0.2}
    with caplog.at_level(logging.INFO):
        sinks.record(record, print_line=True)
        sinks.record_eval(10, EvalResult(loss=3.5, accuracy=0.75))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["loss"] == 0.1 + 0.2 and lines[1] == {"iteration": 10, "eval_loss": 3.5,
                                                                 "eval_accuracy": 0.75}
    assert "lm loss" in caplog.text and "validation loss at iteration 10" in caplog.text
    assert "accuracy: 75.00 %" in caplog.text


def test_inactive_sink_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricSinks(active=False, train_iters=4, jsonl=path).record(RECORD, print_line=True)
    assert not path.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard installed")
def test_tensorboard_without_extra_names_the_extra(tmp_path):
    with pytest.raises(RuntimeError, match=r"megatron-mimo\[tb\]"):
        MetricSinks(active=True, train_iters=4, tensorboard_dir=str(tmp_path))
