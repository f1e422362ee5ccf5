"""Hugging Face conversion checked against transformers itself.

``one`` (one process): tiny random LLaVAs (CLIP and SigLIP towers, grouped-query attention, a
vocabulary that no TP divides) and a separate vision + LLM pair are built with transformers,
imported, exported and compared: tensors bit for bit, ``from_pretrained`` loading info, and our
logits against transformers' at TP1. Bad inputs run through the command's own entry point.

``layout`` (a gloo world): an imported checkpoint loaded with ``--finetune`` at a hetero layout;
the language last stage gathers its vocabulary-parallel logits of one global batch, the images
ranks return their pixels, all keyed by sample, for the test to feed transformers.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tests.workers.common import worker_main

IMAGES_TOKENS_RANGE = (5, 25)
"""Ids of ordinary words in the tiny tokenizer (0-4 are specials and ``<image>``)."""


@dataclass
class RoundTrip:
    """One import -> export of a tiny model."""

    name: str
    identical: bool
    """Every tensor of the export equals the original (names, dtypes, values)."""
    loading_info: dict[str, list[str]]
    max_logit_error: float
    """Our TP1 logits against transformers', after import."""
    padding_logits: float
    """Largest logit of the padded vocabulary rows (zero rows give exactly 0)."""


@dataclass
class BadInput:
    """What the command printed and returned for one bad input."""

    case: str
    code: int
    stderr: str


@dataclass
class One:
    """Everything the one-process worker checked."""

    trips: list[RoundTrip]
    bad: list[BadInput]
    trained_differs: bool | None = None


@dataclass
class LayoutLogits:
    """One rank's part of a forward pass at a hetero layout."""

    branch: str
    keys: list[str]
    pixels: list[list] | None = None
    input_ids: list[list[int]] | None = None
    logits: list | None = None


def convert(*argv: str) -> tuple[int, str]:
    """Run ``megatron-mimo convert`` in this process; (exit code, stderr)."""
    from megatron_mimo.convert.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def hf_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    result = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        result.update(load_file(str(path)))
    return result


def our_logits(root: Path, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Our model at TP1 in this process, loaded from ``root``."""
    from megatron_mimo.convert.checkpoint_io import load_model, resolve, saved_model_config
    from megatron_mimo.convert.single import build_model, one_process_world
    from megatron_mimo.models.vision import images_inputs

    directory = resolve(root)
    cfg = saved_model_config(directory)
    with one_process_world() as pgs:
        model = build_model(cfg, pgs, meta=True)
        load_model(model, directory)
        model.eval()
        with torch.no_grad():
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            out, _ = model(input_ids=ids, position_ids=positions, attention_mask=None,
                           loss_mask=None, labels=None,
                           modality_inputs={"images": images_inputs(pixels)})
    return out


def sample_inputs(num_image_tokens: int, image_token: int, batch: int = 2, seq: int = 40):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(*IMAGES_TOKENS_RANGE, (batch, seq), generator=gen)
    ids[:, 1:1 + num_image_tokens] = image_token
    return ids, torch.randn(batch, 3, 32, 32, generator=gen)


def hf_logits(directory: Path, ids: torch.Tensor, pixels: torch.Tensor):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(str(directory),
                                                                output_loading_info=True)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, pixel_values=pixels).logits
    return logits, {k: sorted(map(str, v)) for k, v in info.items()}


def round_trip(tmp: Path, name: str, source: Path, imported: Path) -> RoundTrip:
    exported = tmp / f"{name}-export"
    code, err = convert("export-hf", str(imported), str(exported))
    assert code == 0, err
    from examples.tiny_llava import IMAGE_TOKEN_ID

    ids, pixels = sample_inputs(16, IMAGE_TOKEN_ID)
    reference, info = hf_logits(exported, ids, pixels)
    padded = our_logits(imported, ids, pixels)
    ours, real = padded[..., :reference.shape[-1]], reference.shape[-1]
    original, back = hf_state(source), hf_state(exported)
    identical = sorted(original) == sorted(back) and all(
        original[k].dtype == back[k].dtype and torch.equal(original[k], back[k]) for k in original)
    return RoundTrip(name, identical, info, (ours - reference).abs().max().item(),
                     padded[..., real:].abs().max().item())


def bad_inputs(tmp: Path, llava: Path, pair: Path) -> list[BadInput]:
    """Each bad input once; the test checks one line and exit code 1."""
    cases = []
    not_llava = pair / "language"  # a Llama directory is not a LLaVA
    cases.append(("non-llava", convert("import-hf", str(not_llava), str(tmp / "bad1"))))
    sharded = tmp / "sharded"
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(str(llava)).save_pretrained(
        sharded, max_shard_size="100KB")
    shutil.copy2(llava / "tokenizer.json", sharded / "tokenizer.json")
    sorted(sharded.glob("model-*.safetensors"))[1].unlink()
    cases.append(("missing-shard", convert("import-hf", str(sharded), str(tmp / "bad2"))))
    no_image = tmp / "no-image"
    shutil.copytree(llava, no_image)
    from megatron_mimo.data.hf_tokenizer import write_word_level

    (no_image / "tokenizer.json").unlink()
    write_word_level(["the digit"], tmp / "plain")
    text = (tmp / "plain" / "tokenizer.json").read_text().replace('"<image>"', '"<picture>"')
    (no_image / "tokenizer.json").write_text(text)
    cases.append(("no-image-token", convert("import-hf", str(no_image), str(tmp / "bad3"))))
    trained = tmp / "never-imported"  # a checkpoint with no hf/ folder
    shutil.copytree(tmp / "clip-ckpt", trained, ignore=shutil.ignore_patterns("hf"))
    cases.append(("not-imported", convert("export-hf", str(trained), str(tmp / "bad4"))))
    return [BadInput(case, code, err) for case, (code, err) in cases]


def one(args: dict[str, Any]) -> One:
    from examples.tiny_llava import build

    tmp = Path(args["tmp"])
    trips = []
    for name, tower, tie in (("clip", "clip", False), ("siglip", "siglip", False),
                             ("tied", "clip", True)):
        source = build(tmp / name, tower, tie=tie)
        code, err = convert("import-hf", str(source), str(tmp / f"{name}-ckpt"))
        assert code == 0, err
        trips.append(round_trip(tmp, name, source, tmp / f"{name}-ckpt"))
    pair = build(tmp / "pair", separate=True)
    code, err = convert("import-hf", "--vision", str(pair / "vision"), "--language",
                        str(pair / "language"), str(tmp / "pair-ckpt"))
    assert code == 0, err
    trip = round_trip(tmp, "pair", tmp / "pair" / "language", tmp / "pair-ckpt")
    # the pair's export adds the tower and the projector: compare the language tensors only
    exported, language = hf_state(tmp / "pair-export"), hf_state(pair / "language")
    trip = replace(trip, identical=all(torch.equal(exported["language_model." + k], v)
                                       for k, v in language.items()))
    trips.append(trip)
    return One(trips=trips, bad=bad_inputs(tmp, tmp / "clip", pair))


def layout(args: dict[str, Any]) -> LayoutLogits:
    """Load ``args['checkpoint']`` with --finetune (or as --pretrained-checkpoint, with --load
    ``args['empty']``) at ``args['overrides']``, one forward pass."""
    import torch.distributed as dist

    import megatron_mimo.training.pipeline as pipeline
    from megatron_mimo.config.cli import apply_overrides
    from megatron_mimo.config.layout import IMAGES
    from megatron_mimo.config.presets import tiny_cpu
    from megatron_mimo.convert.checkpoint_io import resolve, saved_model_config
    from megatron_mimo.training.trainer import Trainer

    saved = saved_model_config(resolve(Path(args["checkpoint"])))
    start = ({"checkpoint.pretrained_checkpoint": args["checkpoint"],
              "checkpoint.load": args["empty"]} if "empty" in args else
             {"checkpoint.load": args["checkpoint"], "checkpoint.finetune": True})
    cfg = apply_overrides(replace(tiny_cpu(), images=saved.images, language=saved.language),
                          {**start, **args["overrides"]})
    captured = []
    counted = pipeline.count_correct_answers

    def capture(logits, batch, tp):
        parts = [torch.empty_like(logits) for _ in range(tp.size())]
        dist.all_gather(parts, logits.contiguous(), group=tp)
        captured.append((torch.cat(parts, dim=-1), batch["input_ids"]))
        return counted(logits, batch, tp)

    pipeline.count_correct_answers = capture
    with Trainer(cfg) as trainer:
        assert trainer.load()
        batches = trainer.job.data.next_global_batch()
        low, high = IMAGES_TOKENS_RANGE
        image = cfg.language.image_token_id
        for micro in batches:
            if "input_ids" in micro:  # words of the tiny tokenizer only
                ids = micro["input_ids"]
                micro["input_ids"] = torch.where(ids == image, ids, low + ids % (high - low))
        trainer.job.model.eval()
        pipeline.pipeline_forward_backward(trainer.job, batches, forward_only=True)
        trainer.job.model.train()
        if cfg.checkpoint.save:  # train on, for the export to differ from the import
            for _ in range(cfg.training.train_iters):
                trainer.step()
            trainer.save()
        keys = [k for micro in batches for k in micro["keys"]]
        if trainer.branch == IMAGES:
            pixels = torch.cat([m["pixels"] for m in batches])
            return LayoutLogits(IMAGES, keys, pixels=pixels.tolist())
        if not captured:
            return LayoutLogits("language-inner", keys)
        return LayoutLogits("language", keys, input_ids=torch.cat([c[1] for c in captured]).tolist(),
                            logits=torch.cat([c[0] for c in captured]).tolist())


TIMING = ("ms_per_iteration", "tokens_per_s")


@dataclass
class Records:
    """Metrics records of one rank (timing dropped), by run."""

    runs: dict[str, list[dict[str, Any]]]


def resume(args: dict[str, Any]) -> Records:
    """Phase 'save': 4 iterations straight and 2 with a save, both started from the import with
    --pretrained-checkpoint; phase 'resume' (fresh processes): the same flags, --load now holds
    the save, 2 more iterations."""
    from megatron_mimo.config.cli import config_from_args
    from megatron_mimo.training.trainer import Trainer

    tmp = Path(args["tmp"])

    def train(name: str, iters: int, save: bool) -> list[dict[str, Any]]:
        run = tmp / name
        flags = [*args["flags"], "--pretrained-checkpoint", args["checkpoint"],
                 "--load", str(run), "--train-iters", "4"] + (["--save", str(run)] if save else [])
        cfg, _ = config_from_args(flags)
        with Trainer(cfg) as trainer:
            trainer.load()
            records = [trainer.step() for _ in range(iters)]
            if save:
                trainer.save()
        return [{k: v for k, v in r.items() if k not in TIMING} for r in records]

    if args["phase"] == "save":
        return Records({"straight": train("straight", 4, False), "first": train("cut", 2, True)})
    return Records({"second": train("cut", 2, False)})


def body(args: dict[str, Any]) -> Any:
    return {"one": one, "layout": layout, "resume": resume}[args["mode"]](args)


if __name__ == "__main__":
    worker_main(body)
