"""Worlds on real data (a prepared digits dataset, ``args["data"]``).

Modes (args["mode"]):
  "saved"    4 ranks, images DP2 -> language TP2 DP1; for --num-workers 0 and 2: 2N iterations
             straight, then N iterations + save (the sample keys of every micro-batch on every
             rank are recorded)
  "resumed"  fresh processes: each checkpoint loaded and trained N more iterations; then
             images DP1 -> language DP3: that checkpoint's loader state refused (another
             layout), and sample agreement
  "learning" 2 ranks: held-out accuracy after a short run on digits vs on blank images
"""

from __future__ import annotations

from typing import Any

from megatron_mimo.config import MimoConfig
from megatron_mimo.config.cli import apply_overrides
from megatron_mimo.config.presets import tiny_cpu
from tests.workers.ckpt_world import exact
from tests.workers.common import forbid_parallel_state_groups, worker_main

N = 3
WORKERS = (0, 2)
FAN_OUT = {"images_parallel.dp": 1, "language_parallel.tp": 1, "language_parallel.dp": 3,
           "language_parallel.offset": 1, "training.micro_batch_size": 4,
           "training.global_batch_size": 24}
TWO_RANKS = {"images_parallel.dp": 1, "language_parallel.tp": 1, "language_parallel.offset": 1}
LEARN_ITERS = 200


def make_cfg(data: str, overrides: dict[str, Any]) -> MimoConfig:
    base = {"data.data_path": data, "images.hidden_dropout": 0.1,
            "language.hidden_dropout": 0.1, "scheduler.lr_warmup_iters": N + 1,
            "training.train_iters": 2 * N, "training.global_batch_size": 16,
            "training.micro_batch_size": 8, "checkpoint.ckpt_timeout_s": 60}
    return apply_overrides(tiny_cpu(), {**base, **overrides})


def place(trainer) -> dict[str, Any]:
    """This rank's branch and its DP / TP rank in it."""
    topology = trainer.job.topology
    return {"branch": trainer.branch, "dp": topology.dp_rank(), "tp": topology.tp_rank()}


def steps(trainer, count: int) -> list[dict]:
    """``count`` iterations: the exact record and this rank's sample keys per micro-batch."""
    out = []
    for _ in range(count):
        record = exact(trainer.step())
        out.append({"record": record, "keys": trainer.job.data.last_keys})
    return out


def mode_saved(args: dict) -> dict:
    from megatron_mimo.training.trainer import Trainer

    out = {}
    for workers in WORKERS:
        with Trainer(make_cfg(args["data"], {"data.num_workers": workers})) as straight:
            run = {**place(straight), "straight": steps(straight, 2 * N)}
        root = f"{args['root']}/w{workers}"
        with Trainer(make_cfg(args["data"], {"data.num_workers": workers,
                                             "checkpoint.save": root})) as saved:
            run["until_save"] = steps(saved, N)
            saved.save()
        out[workers] = run
    return out


def _error_of(action) -> str | None:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return None


def mode_resumed(args: dict) -> dict:
    from megatron_mimo.training.trainer import Trainer

    out: dict[str, Any] = {}
    for workers in WORKERS:
        with Trainer(make_cfg(args["data"], {"data.num_workers": workers,
                                             "checkpoint.load": f"{args['root']}/w{workers}"})) as run:
            run.load()
            out[workers] = {"iteration": run.state.iteration, "records": steps(run, N)}
    other_layout = {**FAN_OUT, "checkpoint.load": f"{args['root']}/w0",
                    "checkpoint.no_load_optim": True}
    with Trainer(make_cfg(args["data"], other_layout)) as probe:
        out["other_layout"] = _error_of(probe.load)
    with Trainer(make_cfg(args["data"], FAN_OUT)) as fan_out:
        out["fan_out"] = {**place(fan_out), "steps": steps(fan_out, N)}
    return out


def mode_learning(args: dict) -> dict:
    from megatron_mimo.training.trainer import Trainer

    learn = {**TWO_RANKS, "training.train_iters": LEARN_ITERS, "training.eval_iters": 18,
             "training.micro_batch_size": 16, "training.global_batch_size": 16,
             "images.hidden_dropout": 0.0, "language.hidden_dropout": 0.0,
             "scheduler.lr_warmup_iters": 10, "optimizer.lr": 3e-3, "optimizer.min_lr": 3e-4,
             "optimizer.images_lr": 3e-3}
    out = {}
    for name, blank in (("real", False), ("blank", True)):
        with Trainer(make_cfg(args["data"], {**learn, "data.blank_images": blank})) as trainer:
            losses = [trainer.step()["loss"] for _ in range(trainer.cfg.training.train_iters)]
            result = trainer.evaluate()
            out[name] = {"train_loss": losses[-1], "loss": result.loss,
                         "accuracy": result.accuracy}
    return out


MODES = {"saved": mode_saved, "resumed": mode_resumed, "learning": mode_learning}


def body(args: dict) -> Any:
    forbid_parallel_state_groups()
    return MODES[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
