"""The in-place checkpoint reader (megatron_mimo/checkpoint/reader.py): what it loads equals what
torch's own reader loads, for every layout; the common case (whole contiguous tensors, or
row slices of them) is read in place; a file that ends early is one error naming it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader

from megatron_mimo.checkpoint.reader import InPlaceReader, _fill, readers
from megatron_mimo.compat.checkpointing import read_by
from megatron_mimo.convert.single import one_process_world
from megatron_mimo.errors import CheckpointError


def stored() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "matrix": torch.randn(6, 5, generator=generator),
        "half": torch.randn(3, 7, generator=generator).to(torch.bfloat16),
        "ints": torch.arange(11, dtype=torch.int64) * 7,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(4, 3, generator=generator).t(),  # stored with its strides
        "slice": torch.randn(10, 4, generator=generator)[3:7],     # stored with its storage
    }


def targets(template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full(v.shape, -1, dtype=v.dtype) for k, v in template.items()}


def load(directory: Path, reader) -> dict[str, torch.Tensor]:
    into = targets(stored())
    dcp.load(into, storage_reader=reader, no_dist=True)
    return into


@pytest.fixture
def saved(tmp_path) -> Path:
    dcp.save(stored(), checkpoint_id=str(tmp_path), no_dist=True)
    return tmp_path


def test_loads_what_torch_loads(saved):
    reader = InPlaceReader(saved)
    ours, torchs = load(saved, reader), load(saved, FileSystemReader(saved))
    for key, value in stored().items():
        assert torch.equal(ours[key], value), key
        assert torch.equal(ours[key], torchs[key]), key
    # all but the transposed tensor (its bytes are not in the target's order) and the empty one
    # (DCP asks nothing of it)
    assert reader.in_place == 5


def test_non_contiguous_targets_are_filled_too(saved):
    into = {"matrix": torch.full((5, 6), -1.0).t()}  # a transposed view: copied, not read into
    reader = InPlaceReader(saved)
    dcp.load(into, storage_reader=reader, no_dist=True)
    assert torch.equal(into["matrix"], stored()["matrix"]) and reader.in_place == 0


def test_given_metadata_is_not_parsed_again(saved, monkeypatch):
    metadata = FileSystemReader(saved).read_metadata()
    monkeypatch.setattr(FileSystemReader, "read_metadata", lambda *a, **k: pytest.fail("parsed"))
    assert torch.equal(load(saved, InPlaceReader(saved, metadata))["ints"], stored()["ints"])


def test_a_file_that_ends_early_is_one_error_naming_it():
    # (a file cut in the middle loses its items' zip directories first: torch's own error, as
    # with torch's reader; this is a file cut between the header and the data being read)
    target = torch.zeros(4)
    with pytest.raises(CheckpointError, match="shard.distcp: ends 4 bytes early"):
        _fill(io.BytesIO(bytes(12)), target, Path("/ckpt/shard.distcp"))
    _fill(io.BytesIO(torch.arange(4.0).numpy().tobytes()), target, Path("x"))
    assert target.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_megatron_loads_resharded_slices_through_the_reader(tmp_path):
    # saved as one 8x4 chunk; loaded as rows 2-3 (in place, at an offset in the file) and as
    # columns 2-3 (not one run of bytes: torch's path); both equal the saved values
    full = torch.arange(32.0).reshape(8, 4)
    with one_process_world():
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", full.clone())},
                                str(tmp_path))
        metadata = FileSystemReader(tmp_path).read_metadata()
        made = []

        def counted(path):
            made.append(readers(tmp_path, metadata)(path))
            return made[-1]

        rows, cols = torch.zeros(2, 4), torch.zeros(8, 2)
        for part, offsets in ((rows, (0, 1, 4)), (cols, (1, 1, 2))):
            with read_by(counted) as strategy:
                dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", part, offsets)},
                                        str(tmp_path), sharded_strategy=strategy,
                                        validate_access_integrity=False)
    assert torch.equal(rows, full[2:4]) and torch.equal(cols, full[:, 2:4])
    assert [reader.in_place for reader in made] == [1, 0]
