"""``megatron-mimo convert import-hf``: a Hugging Face LLaVA (or a vision model and an LLM)
becomes a TP1/PP1 checkpoint of ours that ``--load CKPT --finetune`` reads at any layout.

Memory: the model is built without storage (meta device) and each parameter is assigned the
tensor converted from the lazily read HF file(s), so the process holds one copy of the weights,
in the files' dtype. What the model does not use (the tower's layers after the feature layer, its
final norm) is kept beside the checkpoint, with the HF config, the tokenizer files and the
original tensor names, under ``CKPT/hf/``: an export needs nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_mimo.checkpoint import storage
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.convert import hf_config
from megatron_mimo.convert.hf_files import HFWeights, canonical, side_files
from megatron_mimo.convert.rules import COMBINED, PROJECTOR, heads_of, rules_for, to_ours
from megatron_mimo.data.hf_tokenizer import IMAGE_TOKEN, TOKENIZER_FILE
from megatron_mimo.errors import ConvertError

logger = logging.getLogger(__name__)

SIDECAR = storage.SIDECAR_DIRNAME
CONVERSION_FILE = "conversion.json"
UNUSED_FILE = "unused.safetensors"


@dataclass
class Source:
    """The HF tensors to import, by canonical name, and where each comes from."""

    weights: dict[str, tuple[HFWeights, str]] = field(default_factory=dict)
    """canonical name -> (the directory's reader, the name in its file)."""
    keep_names: bool = True
    """Whether an export writes the original names (one LLaVA file) or LLaVA's."""

    def add(self, reader: HFWeights, role: str = "llava") -> None:
        for name in reader.files:
            key = canonical(name, role)
            if key is not None:
                self.weights[key] = (reader, name)

    def get(self, key: str, copy: bool = False) -> torch.Tensor:
        if key not in self.weights:
            raise ConvertError(f"no tensor {key} in the Hugging Face files (looked for it under "
                               f"every known prefix)")
        reader, name = self.weights[key]
        return reader.get(name, copy)


def image_token_in(directory: Path) -> tuple[Path, int | None]:
    """``directory/tokenizer.json`` and its ``<image>`` id (None: the token is absent);
    an unreadable file is one line naming it."""
    from megatron_mimo.data.hf_tokenizer import read_backend

    path = Path(directory) / TOKENIZER_FILE
    return path, read_backend(path).token_to_id(IMAGE_TOKEN)


def check_tokenizer(directory: Path, image_token: int) -> None:
    """The tokenizer must hold LLaVA's image token at the config's id (one line otherwise)."""
    if not (Path(directory) / TOKENIZER_FILE).exists():
        logger.warning("%s has no tokenizer.json: the checkpoint has no tokenizer", directory)
        return
    path, found = image_token_in(directory)
    if found != image_token:
        what = "has no" if found is None else f"has id {found} for the"
        raise ConvertError(f"{path} {what} image token {IMAGE_TOKEN!r} (the model config says "
                           f"{image_token}): add it to the tokenizer (LLaVA's vocabulary has it)")


def import_llava(llava_dir: Path) -> tuple[MimoConfig, dict, Source, Path]:
    """One LLaVA directory: its configs, config.json and tensors."""
    config = hf_config.read_config(llava_dir)
    images, language = hf_config.model_configs(config, str(llava_dir / "config.json"))
    source = Source()
    source.add(HFWeights(llava_dir))
    return MimoConfig(images=images, language=language, name="imported"), config, source, llava_dir


def import_pair(vision_dir: Path, language_dir: Path) -> tuple[MimoConfig, dict, Source, Path]:
    """A vision model directory and an LLM directory; the projector starts from our init."""
    vision = hf_config.vision_section(hf_config.read_config(vision_dir),
                                      str(vision_dir / "config.json"))
    text = hf_config.read_config(language_dir)
    token = _image_token_from_tokenizer(language_dir)
    llava = hf_config.llava_config(vision, text, token)
    images, language = hf_config.model_configs(llava, f"{vision_dir} + {language_dir}")
    source = Source(keep_names=False)
    source.add(HFWeights(vision_dir), "vision")
    source.add(HFWeights(language_dir), "language")
    return (MimoConfig(images=images, language=language, name="imported"), llava, source,
            language_dir)


def _image_token_from_tokenizer(directory: Path) -> int:
    if not (Path(directory) / TOKENIZER_FILE).exists():
        raise ConvertError(f"{Path(directory) / TOKENIZER_FILE} is missing: the LLM's tokenizer "
                           f"must hold the image token {IMAGE_TOKEN!r}")
    path, token = image_token_in(directory)
    if token is None:
        raise ConvertError(f"{path} has no image token {IMAGE_TOKEN!r}: add it to the tokenizer "
                           f"(and a row to the embeddings) before importing")
    return token


def converted_weights(cfg: MimoConfig, source: Source, shapes: dict[str, torch.Size],
                      partial: bool) -> dict[str, torch.Tensor]:
    """Our parameters from the HF tensors, shape-checked; ``partial``: parameters whose tensors
    the source lacks (the projector of a vision + LLM import) keep our initialisation."""
    result = {}
    for rule in rules_for(cfg):
        if partial and rule.ours.startswith(PROJECTOR):
            continue
        combined = rule.kind in COMBINED  # its inputs die once the new tensor exists
        tensor = to_ours(rule, [source.get(name, copy=combined) for name in rule.hf],
                         heads_of(cfg, rule.branch), cfg.language.vocab_size)
        if tensor.shape != shapes[rule.ours]:
            raise ConvertError(f"{rule.hf[0]}: converts to shape {tuple(tensor.shape)}, the model "
                               f"needs {tuple(shapes[rule.ours])} for {rule.ours}")
        result[rule.ours] = tensor
    return result


def write_sidecar(root: Path, config: dict, source: Source, files_dir: Path, used: set[str],
                  dtype: torch.dtype) -> None:
    """``root/hf``: config.json, tokenizer and other side files, the tensors the model does not
    use, and how to name everything on export. Written to a temporary folder, then renamed."""
    from safetensors.torch import save_file

    staging = root / f"{storage.TMP_PREFIX}{SIDECAR}"  # a crash leaves what start-up removes
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in side_files(files_dir):
        if path.name != "config.json":
            shutil.copy2(path, staging / path.name)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    unused = {key: source.get(key) for key in sorted(source.weights) if key not in used}
    save_file({key: t.contiguous() for key, t in unused.items()}, str(staging / UNUSED_FILE))
    names = {key: name for key, (_, name) in source.weights.items()} if source.keep_names else {}
    conversion = {"real_vocab_size": config["text_config"]["vocab_size"], "names": names,
                  "dtype": str(dtype).removeprefix("torch.")}
    (staging / CONVERSION_FILE).write_text(json.dumps(conversion, indent=1) + "\n")
    final = root / SIDECAR
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


def import_hf(out: Path, llava_dir: Path | None = None, vision_dir: Path | None = None,
              language_dir: Path | None = None) -> Path:
    """Convert and write checkpoint 0 of ``out`` (with ``out/hf``); return its directory."""
    from megatron_mimo.convert.checkpoint_io import save_model
    from megatron_mimo.convert.single import build_model, one_process_world

    if llava_dir is not None:
        cfg, config, source, files_dir = import_llava(Path(llava_dir))
    else:
        cfg, config, source, files_dir = import_pair(Path(vision_dir), Path(language_dir))
    check_tokenizer(files_dir, cfg.language.image_token_id)
    with one_process_world() as pgs:
        model = build_model(cfg, pgs, meta=llava_dir is not None)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        weights = converted_weights(cfg, source, shapes, partial=llava_dir is None)
        missing = sorted(set(shapes) - set(weights))
        if llava_dir is not None and missing:
            raise ConvertError(f"no Hugging Face tensor for {missing[0]} "
                               f"(and {len(missing) - 1} more)")
        dtype = next(iter(weights.values())).dtype
        model.load_state_dict(weights, strict=False, assign=True)
        model.to(dtype)
        used = {name for rule in rules_for(cfg) if rule.ours in weights for name in rule.hf}
        logger.info("converted %d tensors into %d parameters (%s); %d HF tensors kept aside",
                    len(used), len(weights), dtype, len(source.weights) - len(used))
        write_sidecar(Path(out), config, source, files_dir, used, dtype)
        return save_model(model, cfg, Path(out))
