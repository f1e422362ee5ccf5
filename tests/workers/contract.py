"""The typed contract between a spawned test rank and its test: results are dataclasses.

A worker mode returns a dataclass (or a list/dict of them); :func:`encode` turns it into JSON
with the class named beside its fields, :func:`decode` (called by :func:`tests.harness.run_world`)
builds the same dataclass in the test process. A field the worker forgets to fill, or one the
test reads under another name, then fails at once as a TypeError / AttributeError instead of a
``KeyError`` on a loose dict deep inside an assertion. Only classes defined under
``tests.workers`` are rebuilt.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any

TAG = "__result__"
PACKAGE = "tests.workers."


def encode(value: Any) -> Any:
    """JSON-ready form of ``value``; dataclasses keep their class name under :data:`TAG`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {TAG: f"{_importable_module(cls)}:{cls.__qualname__}", **fields}
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encode(item) for item in value]
    return value


def _importable_module(cls: type) -> str:
    """The name the test process imports ``cls``'s module by: a rank runs its worker as
    ``python -m tests.workers.<name>``, so the worker's own classes live in ``__main__``."""
    if cls.__module__ == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is not None:
            return spec.name
    return cls.__module__


def decode(value: Any) -> Any:
    """Inverse of :func:`encode`: tagged dicts become their dataclass again."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    fields = {key: decode(item) for key, item in value.items() if key != TAG}
    if TAG not in value:
        return fields
    module, _, name = value[TAG].partition(":")
    if not module.startswith(PACKAGE):
        raise ValueError(f"refusing to rebuild {value[TAG]}: not a tests.workers result")
    return getattr(importlib.import_module(module), name)(**fields)
