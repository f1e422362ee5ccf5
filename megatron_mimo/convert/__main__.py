"""``megatron-mimo convert {import-hf,export-hf}``: one process each, no torchrun, no GPU.

Bad input (a non-LLaVA directory, a missing shard, a tokenizer without the image token, a
checkpoint that was never imported) is one line and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from megatron_mimo.errors import MimoError

EXIT_INPUT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """Both subcommands and their arguments."""
    parser = argparse.ArgumentParser(prog="megatron-mimo convert",
                                     description="Convert between Hugging Face LLaVA directories "
                                                 "and megatron-mimo checkpoints (one process).")
    sub = parser.add_subparsers(dest="action", required=True)
    into = sub.add_parser("import-hf", help="HF LLaVA directory (or --vision + --language) -> "
                                            "TP1/PP1 checkpoint")
    into.add_argument("paths", nargs="+", metavar="DIR",
                      help="HF_DIR CKPT_DIR, or CKPT_DIR alone with --vision and --language")
    into.add_argument("--vision", type=Path, help="a CLIP or SigLIP model directory")
    into.add_argument("--language", type=Path, help="a Llama-family LLM directory (its "
                                                    "tokenizer must hold '<image>')")
    out = sub.add_parser("export-hf", help="checkpoint of any layout -> HF LLaVA directory")
    out.add_argument("checkpoint", type=Path, help="save directory of the checkpoint")
    out.add_argument("output", type=Path, help="directory to write the HF model into")
    out.add_argument("--ckpt-step", type=int, help="iteration to export (default: the latest)")
    out.add_argument("--max-shard-size-gb", type=float, default=2.0,
                     help="largest safetensors file written (default: 2)")
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    return parser


def _import(args: argparse.Namespace) -> Path:
    from megatron_mimo.convert.importer import import_hf

    pair = args.vision is not None or args.language is not None
    if pair and (args.vision is None or args.language is None or len(args.paths) != 1):
        raise SystemExit("megatron-mimo convert: error: --vision and --language go together, "
                         "with one CKPT_DIR")
    if not pair and len(args.paths) != 2:
        raise SystemExit("megatron-mimo convert: error: import-hf takes HF_DIR CKPT_DIR")
    for path in [*args.paths[:-1], args.vision, args.language]:
        if path is not None and not Path(path).is_dir():
            raise MimoError(f"{path}: no such directory")
    if pair:
        return import_hf(Path(args.paths[0]), vision_dir=args.vision, language_dir=args.language)
    return import_hf(Path(args.paths[1]), llava_dir=Path(args.paths[0]))


def _export(args: argparse.Namespace) -> Path:
    from megatron_mimo.convert.exporter import export_hf

    written = export_hf(args.checkpoint, args.output, args.ckpt_step,
                        int(args.max_shard_size_gb * (1 << 30)))
    return written[0].parent


def quiet(level: str) -> None:
    """Our progress lines at ``level``; third-party chatter (megatron-core deprecations, torch
    checkpoint warnings) only with DEBUG. One-process commands call this first."""
    from megatron_mimo.metrics.log import quiet_third_party

    quiet_third_party(level)
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if logging.getLevelName(level) != logging.DEBUG:
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        warnings.filterwarnings("ignore", category=FutureWarning)
        for name in ("megatron", "torch"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one conversion; print where it wrote."""
    args = build_parser().parse_args(argv)
    quiet(args.log_level)
    start = time.perf_counter()
    try:
        done = _import(args) if args.action == "import-hf" else _export(args)
    except MimoError as error:
        print(f"megatron-mimo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(f"wrote {done} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
