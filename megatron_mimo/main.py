"""The ``megatron-mimo`` command: flags -> config, then one training run per torchrun rank.

``megatron-mimo checkpoint {inspect,verify} DIR`` runs the checkpoint tools and
``megatron-mimo data prepare-digits OUT`` prepares a dataset, ``megatron-mimo convert
{import-hf,export-hf}`` converts from and to Hugging Face and ``megatron-mimo generate`` decodes
from a checkpoint (one process each, no torchrun).

Exit codes: 0 done; 1 an error in the input (flags, files, checkpoint, data), printed as one line
per rank (``--log-level DEBUG`` adds the traceback); 2 a bad command line or layout; 75 stopped
early by a signal or the time budget (resume me).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence

from megatron_mimo.config.cli import config_from_args, format_layout, name_flags
from megatron_mimo.errors import ConfigError, MimoError

EXIT_INPUT_ERROR = 1
EXIT_USAGE = 2


def _error(message: str) -> None:
    print(f"megatron-mimo: error: {name_flags(message)}", file=sys.stderr, flush=True)


def _launch_world_size() -> int | None:
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def data_command(argv: Sequence[str]) -> int:
    """``megatron-mimo data ...``: bad input is one line and exit code 1."""
    from megatron_mimo.data.digits import data_main

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return data_main(argv)
    except MimoError as error:
        _error(str(error))
        return EXIT_INPUT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``megatron-mimo`` and ``examples/pretrain_hetero_mimo.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["checkpoint"]:  # the one-process checkpoint tools
        from megatron_mimo.checkpoint.tools import main as checkpoint_tools

        return checkpoint_tools(argv[1:])
    if argv[:1] == ["data"]:
        return data_command(argv[1:])
    if argv[:1] == ["generate"]:  # greedy decoding, one process
        from megatron_mimo.generate import main as generate

        return generate(argv[1:])
    if argv[:1] == ["convert"]:  # Hugging Face in and out, one process
        from megatron_mimo.convert.__main__ import main as convert

        return convert(argv[1:])
    try:
        cfg, args = config_from_args(argv)
        world_size = _launch_world_size()
        if world_size is not None and world_size != cfg.world_size:
            raise ConfigError(
                f"the layout needs {cfg.world_size} ranks but torchrun started {world_size}: "
                + "; ".join(s.describe() for s in cfg.branch_specs()))
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank would print the same line
            _error(str(error))
        return EXIT_USAGE
    if args.dry_run:
        print(format_layout(cfg))
        return 0
    if "RANK" not in os.environ:
        _error(f"not launched by torchrun; run: torchrun --standalone --nproc-per-node "
               f"{cfg.world_size} examples/pretrain_hetero_mimo.py --config {cfg.name} ... "
               f"(or add --dry-run to only check the layout)")
        return EXIT_USAGE
    from megatron_mimo.metrics.log import quiet_third_party

    quiet_third_party(cfg.logging.log_level)  # before torch and megatron-core are imported
    from megatron_mimo.training.trainer import run

    try:
        return run(cfg)
    except MimoError as error:
        if logging.getLevelName(cfg.logging.log_level) == logging.DEBUG:
            traceback.print_exc()
        _error(f"rank {os.environ['RANK']}: {error}")
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
