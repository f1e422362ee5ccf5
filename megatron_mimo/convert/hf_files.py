"""Hugging Face weight files: read one tensor at a time, write in shards, and the names.

Files name a LLaVA's tensors differently by transformers version and by origin (a LLaVA file, a
CLIP or SigLIP model, a Llama model): ``vision_tower.vision_model.encoder...``,
``model.vision_tower.encoder...``, ``language_model.model.layers...``, ``model.layers...``.
:func:`canonical` maps each onto one prefix per part (``vision.``, ``projector.``, ``text.``,
``lm_head.``) and the import keeps every original name, so an export writes the names it read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_mimo.errors import ConvertError

LLAVA_FILE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.language_model.model.", "text."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
)
"""(file prefix, canonical prefix) of a LLaVA file, most specific first."""

VISION_FILE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.", "vision."),
    *((part, "vision." + part) for part in ("embeddings.", "encoder.", "pre_layrnorm.",
                                             "post_layernorm.", "head.")),
)
"""A CLIP/SigLIP model file: ``vision_model.*`` (a full CLIP model, whose text tower is not
taken), or the vision transformer's own names (a vision model saved by transformers 5)."""

LANGUAGE_FILE_PREFIXES: tuple[tuple[str, str], ...] = (("model.", "text."), ("lm_head.", "lm_head."))
"""A Llama model file."""

PREFIXES = {"llava": LLAVA_FILE_PREFIXES, "vision": VISION_FILE_PREFIXES,
            "language": LANGUAGE_FILE_PREFIXES}
"""File prefixes by the role of the directory."""

LLAVA_PREFIXES = {"vision.": "vision_tower.", "projector.": "multi_modal_projector.",
                  "text.": "language_model.model.", "lm_head.": "language_model.lm_head."}
"""File names an export uses for tensors that came from separate vision and LLM directories
(those transformers 5 writes for a LLaVA)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def canonical(name: str, role: str = "llava") -> str | None:
    """Canonical name of a tensor of a ``role`` directory (llava, vision or language); None
    for tensors that are not part of a LLaVA (e.g. a CLIP model's text tower)."""
    for prefix, part in PREFIXES[role]:
        if name.startswith(prefix):
            return part + name[len(prefix):]
    return None


def llava_name(canonical_name: str) -> str:
    """File name of a tensor with no original name (the LLaVA naming)."""
    for part, prefix in LLAVA_PREFIXES.items():
        if canonical_name.startswith(part):
            return prefix + canonical_name[len(part):]
    raise ValueError(f"not a canonical LLaVA tensor name: {canonical_name}")


class HFWeights:
    """The safetensors files of one HF directory, read lazily (one tensor in memory at a time)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.files = self._weight_map()
        self._open: dict[tuple[str, bool], object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise ConvertError(f"{index}: unreadable weight index ({error})") from None
            for name in sorted(set(weight_map.values())):
                if not (self.directory / name).exists():
                    raise ConvertError(f"{self.directory / name} is missing (named in {index})")
            return weight_map
        single = self.directory / SINGLE_NAME
        files = [single] if single.exists() else sorted(self.directory.glob("*.safetensors"))
        if not files:
            others = [p.name for p in self.directory.glob("*") if p.suffix in WEIGHT_SUFFIXES]
            what = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
            raise ConvertError(f"{self.directory}: no safetensors weights{what}")
        return {name: path.name for path in files for name in self._keys(path)}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())

    def get(self, name: str, copy: bool = False) -> torch.Tensor:
        """One tensor. By default a view of the memory-mapped file (no copy: right for a tensor
        used as it is); ``copy`` reads it into its own memory, for a tensor that is only an input
        to a new one (the mapped pages would otherwise stay counted against the process)."""
        from safetensors import safe_open

        file = self.files[name]
        if (file, copy) not in self._open:
            options = {"backend": "pread"} if copy else {}
            self._open[file, copy] = safe_open(str(self.directory / file), "pt", **options)
        return self._open[file, copy].get_tensor(name)  # type: ignore[attr-defined]


def write_shards(directory: Path, names: list[str], sizes: dict[str, int],
                 produce: Iterable[tuple[str, torch.Tensor]],
                 max_shard_bytes: int = 2 << 30) -> list[Path]:
    """Write tensors in name order into shards of at most ``max_shard_bytes`` (one
    ``model.safetensors`` when they fit, else numbered shards and the index HF reads).

    ``produce`` yields ``(name, tensor)`` in ``names`` order; only one shard is in memory."""
    from safetensors.torch import save_file

    groups, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > max_shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    groups.append(current)
    files = ([SINGLE_NAME] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    stream = iter(produce)
    weight_map, written = {}, []
    for group, file in zip(groups, files, strict=True):
        shard = {}
        for expected in group:
            name, tensor = next(stream)
            if name != expected:
                raise RuntimeError(f"tensor {name} produced out of order (expected {expected})")
            shard[name] = tensor.contiguous()
            weight_map[name] = file
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        written.append(directory / file)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return written


def side_files(directory: Path) -> list[Path]:
    """Files of an HF directory that are not weights (config, tokenizer, chat template, ...)."""
    return sorted(p for p in Path(directory).iterdir()
                  if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name != INDEX_NAME)
