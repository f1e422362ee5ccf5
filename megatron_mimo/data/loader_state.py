"""Energon's loader state as plain types, and the record that must match before it is restored.

Why plain types: our checkpoints load with ``torch.load(weights_only=True)``, which refuses
Energon's state (``FlexState`` is a dict subclass, the state classes are dataclasses, and with
worker processes numpy arrays and scalars appear). :func:`to_plain` tags each of those as a
dict/list/tensor structure; :func:`from_plain` rebuilds them, importing only classes of Energon
itself. Nothing is relaxed on the loading side.

Why a record: Energon's ``restore_state_rank`` checks nothing. Another world size resumes with
duplicate samples, another rank's state is taken silently, a changed seed is ignored and a changed
worker count fails with a bare ``AssertionError``. :class:`LoaderRecord` is saved beside the
state and a resume whose record differs is refused with one line saying what differs.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_mimo.errors import DataError

TAG = "__energon__"
"""Key marking a tagged value in the plain structure."""
ALLOWED_MODULE_PREFIX = "megatron.energon."


def to_plain(value: Any) -> Any:
    """Dicts, lists, tuples, tensors, str/bytes/numbers/None only; other values are tagged."""
    if isinstance(value, (str, bytes, bool, int, float, type(None), torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return {TAG: "ndarray", "data": torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return {TAG: "numpy_scalar", "dtype": value.dtype.str, "value": value.item()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", "class": _class_path(value), "fields": fields}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {TAG: "namedtuple", "class": _class_path(value), "items": [to_plain(v) for v in value]}
    if isinstance(value, dict):
        items = {k: to_plain(v) for k, v in value.items()}
        return items if type(value) is dict else {TAG: "dict", "class": _class_path(value),
                                                  "items": items}
    if isinstance(value, (list, tuple)):
        converted = [to_plain(v) for v in value]
        return converted if isinstance(value, list) else tuple(converted)
    raise DataError(f"loader state holds a {type(value).__module__}.{type(value).__name__}, "
                    f"which has no plain form; megatron-energon changed its state format?")


def from_plain(value: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    if isinstance(value, dict):
        kind = value.get(TAG)
        if kind is None:
            return {k: from_plain(v) for k, v in value.items()}
        if kind == "ndarray":
            return value["data"].numpy().copy()
        if kind == "numpy_scalar":
            return np.dtype(value["dtype"]).type(value["value"])
        cls = _allowed_class(value["class"])
        if kind == "dataclass":
            return cls(**{k: from_plain(v) for k, v in value["fields"].items()})
        if kind == "namedtuple":
            return cls(*[from_plain(v) for v in value["items"]])
        return cls({k: from_plain(v) for k, v in value["items"].items()})
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(from_plain(v) for v in value)
    return value


def _class_path(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}:{cls.__qualname__}"


def _allowed_class(path: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith(ALLOWED_MODULE_PREFIX):
        raise DataError(f"loader state names class {path}: only megatron.energon classes are "
                        f"rebuilt from a checkpoint")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class LoaderRecord:
    """Everything the order of a rank's samples depends on; saved beside the loader state."""

    data_path: str
    """Dataset folder (its absolute path)."""
    num_views: int
    """Energon world size: how many readers split the dataset."""
    views: tuple[int, ...]
    """The readers (Energon ranks) this rank runs."""
    num_workers: int
    """Worker processes per reader (the order depends on num_views x num_workers)."""
    seed: int
    """Energon seed_offset."""
    batch_size: int
    """Samples each reader yields per micro-step."""
    tokenizer: str = ""
    """Checksum of --tokenizer-model's tokenizer.json ('' for the dataset's word list): other
    ids for the same captions are other samples (a copy of the same file elsewhere is fine)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain form (lists, not tuples)."""
        return {**dataclasses.asdict(self), "views": list(self.views)}

    def check_saved(self, saved: dict[str, Any], where: str) -> None:
        """Refuse a state saved under another record, naming every difference and what to do."""
        mine = self.as_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        diff = [f"{name} {saved.get(name, defaults[name])!r} -> {value!r}"
                for name, value in mine.items() if saved.get(name, defaults[name]) != value]
        if diff:
            raise DataError(
                f"{where}: the data loader state was saved with other settings ("
                + "; ".join(diff) + "): resume with the saved --data-path, layout, "
                "--num-workers, --seed, batch sizes and --tokenizer-model, or start the data afresh "
                "with --finetune")
