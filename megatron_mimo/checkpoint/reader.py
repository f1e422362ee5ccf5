"""A DCP storage reader that reads tensors straight into their targets.

torch's ``FileSystemReader`` loads every stored tensor into a fresh tensor, then copies it into
the tensor being loaded: the bytes cross memory twice and a load allocates (and page-faults) as
much memory again as it reads. Where the stored tensor's bytes are one contiguous run of the
file and the target is a contiguous CPU tensor of the same dtype and shape, this reader reads the
bytes into the target instead (one ``readinto``). Everything else (byte items, resharded slices
that are not contiguous, accelerator targets, transformed streams) goes through torch's own path,
so what is loaded never depends on which path read it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from megatron_mimo.errors import CheckpointError


class InPlaceReader(FileSystemReader):
    """``FileSystemReader`` that fills contiguous CPU targets directly from the file; given
    ``metadata`` (the directory's ``.metadata``, parsed already), it does not parse it again."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self.metadata = metadata
        self.in_place = 0
        """Tensor items read straight into their targets (the rest went through torch)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.metadata is None or kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)
        if getattr(self.metadata, "storage_meta", None) is None:  # as torch's reader does
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        rest: list[ReadItem] = []
        for relative, items in self._by_file(plan.items).items():
            path = self.fs.concat_path(self.path, relative)
            with self.fs.create_stream(path, "rb") as stream:
                rest += [item for item in items if not self._read_in_place(stream, path, item,
                                                                            planner)]
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        done: Future = Future()
        done.set_result(None)
        return done

    def _by_file(self, items: list[ReadItem]) -> dict[str, list[ReadItem]]:
        """Items per file, in file order (one forward pass over each file)."""
        files: dict[str, list[ReadItem]] = {}
        for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
            files.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        return files

    def _read_in_place(self, stream: Any, path: Any, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read ``item`` into its target if its bytes allow it; False leaves it to torch."""
        info = self.storage_data[item.storage_index]
        if item.type != LoadItemType.TENSOR or info.transform_descriptors:
            return False
        source = _stored_layout(self._slice_file(stream, info), item)
        if source is None:
            return False
        target = planner.resolve_tensor(item).detach()
        if not _fits(source, target):
            planner.commit_tensor(item, _copied(self._slice_file(stream, info), item, target))
            return True
        stream.seek(info.offset + source.untyped_storage()._checkpoint_offset
                    + source.storage_offset() * source.element_size())
        _fill(stream, target, path)
        planner.commit_tensor(item, target)
        self.in_place += 1
        return True


def readers(directory: str | os.PathLike,
            metadata: Metadata | None) -> Callable[[Any], InPlaceReader]:
    """Reader factory for megatron-core's load: ``directory``'s metadata as parsed already
    (None: read from its file, as any other directory's)."""
    known = os.path.abspath(directory)

    def reader(path: Any) -> InPlaceReader:
        return InPlaceReader(path, metadata if os.path.abspath(path) == known else None)

    return reader


def _stored_layout(stored: Any, item: ReadItem) -> torch.Tensor | None:
    """The stored tensor as a meta tensor (its dtype, shape, strides and data offset, nothing
    read), narrowed to what ``item`` asks for; None when its bytes are not one run."""
    header = torch.load(stored, map_location="meta", weights_only=True)
    if not isinstance(header, torch.Tensor) or sys.byteorder != "little":
        return None
    header = _narrowed(header, item)
    contiguous = header.is_contiguous()
    return header if contiguous and hasattr(header.untyped_storage(), "_checkpoint_offset") \
        else None


def _narrowed(tensor: torch.Tensor, item: ReadItem) -> torch.Tensor:
    """The part of a stored tensor that ``item`` reads (a view)."""
    for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


def _fits(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``source``'s bytes can be read into ``target`` as they are."""
    return (type(target) is torch.Tensor and target.device.type == "cpu"
            and target.is_contiguous() and target.dtype == source.dtype
            and target.shape == source.shape and not target.is_conj() and not target.is_neg())


def _copied(stored: Any, item: ReadItem, target: torch.Tensor) -> torch.Tensor:
    """torch's own way: load the stored tensor, narrow it, copy it into ``target``."""
    loaded = _narrowed(torch.load(stored, map_location="cpu", weights_only=True), item)
    if loaded.shape != target.shape:
        raise CheckpointError(f"{item.dest_index.fqn}: stored shape {tuple(loaded.shape)}, "
                              f"loading into {tuple(target.shape)}")
    return target.copy_(loaded)


def _fill(stream: Any, target: torch.Tensor, path: Any) -> None:
    """Read exactly ``target``'s bytes from ``stream`` into its memory."""
    size = target.numel() * target.element_size()
    if size == 0:
        return
    view = memoryview((ctypes.c_char * size).from_address(target.data_ptr())).cast("B")
    done = 0
    while done < size:
        count = stream.readinto(view[done:])
        if not count:
            raise CheckpointError(f"{Path(path)}: ends {size - done} bytes early (truncated?)")
        done += count
