"""``python -m megatron_mimo.gpu_check``: every check of :mod:`megatron_mimo.gpu_check`, one line
each on stdout and nothing else; everything the checks print goes to a log file. Exit code 0 when
nothing failed, 1 otherwise."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from megatron_mimo.gpu_check.names import (
    FAIL,
    GPU,
    MAMBA_SSM,
    SKIP,
    TE,
    TWO_GPUS,
    Environment,
    Result,
    skip_reason,
)

if TYPE_CHECKING:
    from megatron_mimo.gpu_check.checks import Session

PARITY_KINDS = ("gpt", "vit", "radio", "mamba_hybrid")
PRESETS = ("tiny_cpu", "tiny_cpu_nemotron")


@dataclass(frozen=True)
class Check:
    """A named check, what it needs, and the function of :mod:`.checks` it runs on ``argument``."""

    name: str
    needs: frozenset[str]
    function: str
    argument: str


def _hybrid(name: str) -> frozenset[str]:
    return frozenset({MAMBA_SSM}) if "mamba_hybrid" in name or "nemotron" in name else frozenset()


def all_checks() -> list[Check]:
    """Every check in output order."""
    checks = [Check(f"parity/{k}", frozenset({GPU, TE}) | _hybrid(k), "parity", k)
              for k in PARITY_KINDS]
    checks += [Check(f"finetune-load/{k}", frozenset({GPU, TE}) | _hybrid(k), "finetune_load", k)
               for k in PARITY_KINDS]
    checks += [Check(f"bf16-step/{p}", frozenset({GPU}) | _hybrid(p), "bf16_step", p)
               for p in PRESETS]
    checks += [Check(f"finetune-2gpu/{p}", frozenset({GPU, TWO_GPUS}) | _hybrid(p),
                     "finetune_2gpu", p) for p in PRESETS]
    return checks


def probe(rehearsal: bool) -> Environment:
    """This machine's GPUs and packages (a rehearsal pretends to have all of them)."""
    if rehearsal:
        return Environment(gpus=2, transformer_engine=True, mamba_ssm=True)
    import torch

    return Environment(gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                       transformer_engine=importlib.util.find_spec("transformer_engine") is not None,
                       mamba_ssm=importlib.util.find_spec("mamba_ssm") is not None)


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[TextIO]:
    """Inside, file descriptors 1 and 2 (Python's and every library's output, subprocesses
    included) go to ``log``; yields a stream to the real stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    real = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with log.open("a") as target:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        try:
            yield real
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            real.close()


@contextlib.contextmanager
def session(rehearsal: bool, scratch: Path, log: Path) -> Iterator[Session]:
    """The one-rank world on the GPU (a rehearsal: the CPU) and what the checks share."""
    from megatron_mimo.metrics.log import quiet_third_party

    quiet_third_party("WARNING")
    import torch

    from megatron_mimo.distributed.runtime import select_runtime
    from megatron_mimo.gpu_check import builds, checks

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base_env = dict(os.environ)
    runtime = select_runtime("cpu" if rehearsal else "cuda")
    with builds.solo_world(runtime) as pgs:
        yield checks.Session(runtime, pgs, scratch, log, base_env, rehearsal)


def _described(error: Exception) -> str:
    """``Type: first line of the message`` (the traceback goes to the log)."""
    traceback.print_exc()
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def run_one(check: Check, state: Session, scratch: Path) -> Result:
    """Run a check; an exception is its FAIL line. A FAIL line names the scratch directory
    (log, checkpoints), which is then kept."""
    from megatron_mimo.gpu_check import checks

    try:
        result = getattr(checks, check.function)(state, check.argument)
    except Exception as error:  # noqa: BLE001 - any failure of a check is its FAIL line
        result = Result(FAIL, check.name, _described(error))
    if result.status == FAIL:
        result = Result(FAIL, check.name, f"{result.reason} (log and checkpoints: {scratch})")
    return result


def run_checks(checks: Sequence[Check], env: Environment, rehearsal: bool, scratch: Path,
               log: Path, emit: Callable[[Result], None]) -> list[Result]:
    """Skip what this machine cannot run, run the rest in one session (started by the first
    check that runs; if it cannot start, those checks fail), emit each result."""
    results = []
    with contextlib.ExitStack() as stack:
        state, setup_error = None, None
        for check in checks:
            reason = skip_reason(check.needs, env)
            if reason is None and state is None and setup_error is None:
                try:
                    state = stack.enter_context(session(rehearsal, scratch, log))
                except Exception as error:  # noqa: BLE001 - reported on every check that runs
                    setup_error = _described(error)
            if reason is not None:
                result = Result(SKIP, check.name, reason)
            elif setup_error is not None:
                result = Result(FAIL, check.name, f"setup: {setup_error} (log: {log})")
            else:
                result = run_one(check, state, scratch)
            emit(result)
            results.append(result)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line of the GPU check."""
    parser = argparse.ArgumentParser(prog="python -m megatron_mimo.gpu_check",
                                     description=__doc__)
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="run every check on the CPU, GPU packages hidden, the local spec "
                             "standing in for the GPU build: tests this script, not Transformer "
                             "Engine or mamba-ssm")
    parser.add_argument("--only", metavar="PATTERN", type=_pattern, default=re.compile(""),
                        help="run only the checks whose name matches the regular expression "
                             "PATTERN anywhere (e.g. parity/, or 'parity/|/gpt$')")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (checkpoints, log) even when all passed")
    return parser.parse_args(argv)


def _pattern(text: str) -> re.Pattern:
    """--only's value; a bad expression is argparse's one-line usage error."""
    try:
        return re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"not a regular expression ({error})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; 0 when none failed."""
    args = parse_args(argv)
    if args.rehearse_on_cpu:  # as on a CPU-only install, whatever this machine has
        from megatron_mimo.gpu_check.cpu_save import hide_gpu_packages

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        hide_gpu_packages()
    scratch = Path(tempfile.mkdtemp(prefix="mimo-gpu-check-"))
    log = scratch / "gpu-check.log"
    with output_to(log) as real_stdout:
        env = probe(args.rehearse_on_cpu)
        checks = [check for check in all_checks() if args.only.search(check.name)]
        results = run_checks(checks, env, args.rehearse_on_cpu, scratch, log,
                             partial(_emit, real_stdout))
    failed = any(r.status == FAIL for r in results)
    if not (failed or args.keep):
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


def _emit(stream: TextIO, result: Result) -> None:
    print(result.line(), file=stream, flush=True)


if __name__ == "__main__":
    sys.exit(main())
