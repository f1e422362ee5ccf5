"""Damage done to prepared datasets by the tests that check it is caught."""

from __future__ import annotations

import tarfile
from pathlib import Path


def corrupt_first(shard: Path, extension: str) -> str:
    """Overwrite the first ``.extension`` member's bytes with zeros in place (the index stays
    valid); return its sample key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("." + extension))
    data = bytearray(shard.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = bytes(member.size)
    shard.write_bytes(bytes(data))
    return member.name.removesuffix("." + extension)
