"""``megatron-mimo convert export-hf``: a checkpoint of any layout becomes a Hugging Face LLaVA
directory that ``LlavaForConditionalGeneration.from_pretrained`` loads with no missing or
unexpected key.

Only the model is read (dist_checkpointing reshards it to TP1 in one process; no optimizer
state). The HF config, tokenizer and the tensors the model does not use come from the
checkpoint's ``hf/`` folder, written by the import and carried along by every run that loads it.
Tensors are written in the dtype the import read, one shard in memory at a time, in the names
the import read (or LLaVA's, for a vision + LLM import).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_mimo.checkpoint import storage
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.convert.hf_files import side_files, write_shards
from megatron_mimo.convert.importer import CONVERSION_FILE, SIDECAR, UNUSED_FILE
from megatron_mimo.convert.rules import heads_of, rules_for, to_hf
from megatron_mimo.errors import ConvertError

logger = logging.getLogger(__name__)


def read_sidecar(root: Path) -> tuple[Path, dict]:
    """``root/hf`` and its conversion record (one line if the checkpoint has none)."""
    folder = Path(root) / SIDECAR
    record = folder / CONVERSION_FILE
    if not record.exists():
        raise ConvertError(f"{record} is missing: only a checkpoint imported with `megatron-mimo "
                           f"convert import-hf` (or trained from one) can be exported")
    return folder, json.loads(record.read_text())


class HFTensors:
    """The model's parameters as HF tensors, converted one rule at a time when first asked for
    (an export holds the model and one rule's outputs, not a second copy of the model)."""

    def __init__(self, model: torch.nn.Module, cfg: MimoConfig, real_vocab: int) -> None:
        self.params = dict(model.named_parameters())
        self.cfg, self.real_vocab = cfg, real_vocab
        self.rule_of = {name: rule for rule in rules_for(cfg) for name in rule.hf}
        self._ready: dict[str, torch.Tensor] = {}

    def _convert(self, rule, tensor: torch.Tensor) -> list[torch.Tensor]:
        return to_hf(rule, tensor, heads_of(self.cfg, rule.branch), self.real_vocab)

    def nbytes(self, name: str) -> int:
        """Bytes of one HF tensor (the model is loaded in the export dtype; shapes come from
        meta tensors, nothing is converted)."""
        rule = self.rule_of[name]
        param = self.params[rule.ours]
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        shape = dict(zip(rule.hf, self._convert(rule, meta), strict=True))[name].shape
        return shape.numel() * param.element_size()

    def pop(self, name: str) -> torch.Tensor:
        """One HF tensor; the other outputs of its rule wait for their turn."""
        if name not in self._ready:
            rule = self.rule_of[name]
            parts = self._convert(rule, self.params[rule.ours].detach())
            self._ready.update(zip(rule.hf, parts, strict=True))
        return self._ready.pop(name)


def export_hf(root: Path, out: Path, step: int | None = None,
              max_shard_bytes: int = 2 << 30) -> list[Path]:
    """Write ``out`` (config.json, tokenizer files, safetensors); return the weight files."""
    from safetensors import safe_open

    from megatron_mimo.convert.checkpoint_io import load_model, resolve, saved_model_config
    from megatron_mimo.convert.hf_files import llava_name
    from megatron_mimo.convert.single import build_model, one_process_world

    directory = resolve(Path(root), step)
    folder, record = read_sidecar(Path(root))
    cfg = saved_model_config(directory)
    dtype = getattr(torch, record["dtype"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with one_process_world() as pgs:
        model = build_model(cfg, pgs, meta=True)
        load_model(model, directory, dtype)
    tensors = HFTensors(model, cfg, record["real_vocab_size"])
    unused = safe_open(str(folder / UNUSED_FILE), "pt")
    names = record["names"]

    def file_name(key: str) -> str:
        return names.get(key) or llava_name(key)

    order = sorted(set(tensors.rule_of) | set(unused.keys()), key=file_name)
    sizes = {file_name(k): tensors.nbytes(k) if k in tensors.rule_of
             else _nbytes(unused.get_tensor(k)) for k in order}

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for key in order:
            tensor = tensors.pop(key) if key in tensors.rule_of else unused.get_tensor(key)
            yield file_name(key), tensor.to(dtype)

    written = write_shards(out, [file_name(k) for k in order], sizes, produce(), max_shard_bytes)
    for path in side_files(folder):
        if path.name not in (CONVERSION_FILE,):
            shutil.copy2(path, out / path.name)
    logger.info("exported %s (iteration %s) to %s: %d file(s)", directory,
                storage.read_manifest(directory)["iteration"], out, len(written))
    return written


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
