"""``megatron-mimo generate --load CKPT --image FILE... --prompt TEXT``: greedy decoding on one
process (CPU) from a checkpoint of any layout, the quickest way to see what a run learned (one
line per image).

The model is rebuilt from the checkpoint's manifest at TP1 (dist_checkpointing reshards the
weights whatever layout wrote them) and reads the sequence training builds:
``[BOS, <image> x N, prompt ids]``; each step appends the most likely real token (the vocabulary
padding never wins) until the end token, ``--max-new-tokens`` or the model's ``--seq-length``
(a one-line note on stderr). Stdout holds the continuations only, so scripts can read them.
The tokenizer is ``--tokenizer-model``, else the one an import kept in ``CKPT/hf``; a digits
dataset folder (its word list) works too.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from megatron_mimo.errors import DataError, MimoError

EXIT_INPUT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = argparse.ArgumentParser(prog="megatron-mimo generate",
                                     description="Greedy decoding from a checkpoint, one process.")
    parser.add_argument("--load", type=Path, required=True, help="checkpoint save directory")
    parser.add_argument("--image", type=Path, required=True, nargs="+",
                        help="image file(s) (PNG, JPEG, ...): one output line per image")
    parser.add_argument("--prompt", default="", help="text after the image (e.g. 'the digit')")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="most tokens appended per image (default: 16)")
    parser.add_argument("--tokenizer-model", type=Path,
                        help="tokenizer folder (default: LOAD/hf, kept by an import)")
    parser.add_argument("--ckpt-step", type=int, help="iteration to load (default: the latest)")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="DEBUG shows third-party logs and the traceback of an error")
    return parser


def load_tokenizer(directory: Path | None, load: Path):
    """A Hugging Face tokenizer folder or a dataset's word list, by the file's content."""
    from megatron_mimo.data.hf_tokenizer import HFTokenizer
    from megatron_mimo.data.tokenizer import FORMAT, TOKENIZER_FILENAME, WordTokenizer

    path = (directory or load / "hf") / TOKENIZER_FILENAME
    if not path.exists() and directory is None:
        raise DataError(f"{path} is missing: pass --tokenizer-model (the tokenizer the model "
                        f"was trained with, or the dataset folder)")
    if not path.exists():
        raise DataError(f"--tokenizer-model: {path} is missing (a Hugging Face tokenizer folder "
                        f"or a dataset folder holds one)")
    directory = path.parent
    try:
        word_list = json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError) as error:
        raise DataError(f"{path}: unreadable tokenizer ({error})") from None
    return WordTokenizer.load(directory) if word_list else HFTokenizer.load(directory)


def read_image(path: Path, size: int, pixel_norm: str):
    """``[1, 3, S, S]`` pixels, normalised as training normalises them."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from megatron_mimo.data.energon import normalised_pixels

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: cannot read the image ({type(error).__name__})") from None
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    return normalised_pixels(tensor, size, pixel_norm, str(path))[None]


def check_tokenizer(tokenizer, cfg) -> None:
    """Refuse a tokenizer that is not the model's: ids the model has no row for would index past
    its embedding, and another image id would leave the image tokens unreplaced."""
    if tokenizer.vocab_size > cfg.language.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary "
                        f"{cfg.language.vocab_size}: not the model's tokenizer")
    image_id = tokenizer.image_token_id  # None: a word list, the model's placeholder is used
    if image_id is not None and image_id != cfg.language.image_token_id:
        raise DataError(f"the tokenizer's <image> is id {image_id}, the model's image token "
                        f"{cfg.language.image_token_id}: not the model's tokenizer")


def prompt_ids(cfg, tokenizer, prompt: str) -> list[int]:
    """``[BOS, <image> x N, prompt]``: the start of a training sequence; more positions than the
    model has is an error (it never saw them)."""
    image = [cfg.language.image_token_id] * cfg.images.num_image_tokens
    ids = [tokenizer.bos_id, *image, *(tokenizer.encode(prompt, "--prompt") if prompt else [])]
    if len(ids) > cfg.language.seq_length:
        raise DataError(f"--prompt: BOS, {len(image)} image tokens and the prompt take "
                        f"{len(ids)} positions, the model has {cfg.language.seq_length}")
    return ids


def greedy(model, tokenizer, pixels, ids: list[int], max_new: int,
           seq_length: int) -> tuple[list[int], bool]:
    """Token ids the model appends after ``ids``, and whether it ran out of positions. The whole
    sequence is recomputed each step (no KV cache: sequences are a few dozen tokens)."""
    import torch

    from megatron_mimo.models.vision import images_inputs

    ids, new = list(ids), []
    while len(new) < max_new:
        if len(ids) > seq_length:  # the model has no position for the next token
            return new, True
        batch = torch.tensor([ids])
        with torch.no_grad():
            logits, _ = model(input_ids=batch, position_ids=torch.arange(len(ids))[None],
                              attention_mask=None, loss_mask=None, labels=None,
                              modality_inputs={"images": images_inputs(pixels)})
        token = int(logits[0, -1, :tokenizer.vocab_size].argmax())  # never a padding id
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        new.append(token)
    return new, False


def generate(args: argparse.Namespace) -> list[str]:
    """The continuation of the prompt after each image, as text."""
    from megatron_mimo.convert.checkpoint_io import load_model, resolve, saved_model_config
    from megatron_mimo.convert.single import build_model, one_process_world

    directory = resolve(args.load, args.ckpt_step)
    cfg = saved_model_config(directory)
    tokenizer = load_tokenizer(args.tokenizer_model, args.load)
    check_tokenizer(tokenizer, cfg)
    images = [read_image(path, cfg.images.image_size, cfg.images.pixel_norm)
              for path in args.image]
    start = prompt_ids(cfg, tokenizer, args.prompt)
    texts = []
    with one_process_world() as pgs:
        model = build_model(cfg, pgs, meta=True)
        load_model(model, directory)
        model.eval()
        for path, pixels in zip(args.image, images, strict=True):
            new, full = greedy(model, tokenizer, pixels, start, args.max_new_tokens,
                               cfg.language.seq_length)
            if full:
                print(f"megatron-mimo: note: {path}: stopped at the model's "
                      f"{cfg.language.seq_length} positions", file=sys.stderr)
            texts.append(tokenizer.decode(new))
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    """Print the continuation; bad input is one line and exit code 1."""
    from megatron_mimo.convert.__main__ import quiet

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    quiet(args.log_level)
    missing = [path for path in args.image if not path.is_file()]
    if missing:
        print(f"megatron-mimo: error: {missing[0]}: no such image file", file=sys.stderr)
        return EXIT_INPUT_ERROR
    try:
        print("\n".join(generate(args)))
    except MimoError as error:
        if args.log_level == "DEBUG":
            traceback.print_exc()
        print(f"megatron-mimo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0
