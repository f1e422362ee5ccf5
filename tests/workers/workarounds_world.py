"""One gloo rank: each megatron-core call a process workaround covers fails before the
workarounds are applied and works after; the call-site save workarounds are tried with and
without. Its own ``main`` (not ``worker_main``): the "before" calls need a process in which no
workaround was applied yet."""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_mimo.metrics.log import quiet_third_party
from tests.workers.contract import encode


@dataclass
class Attempt:
    """One call: its value, or the error class and message it raised."""

    ok: bool
    value: Any = None
    error: str | None = None


@dataclass
class Report:
    """Every probe call before and after the process workarounds, and what was applied."""

    before: dict[str, Attempt]
    after: dict[str, Attempt]
    view_in_place_without_alias: Attempt
    finalisation_group_stock: Attempt
    """Which group megatron's own async save finalises on ('default' or 'own')."""
    metadata_reads_stock: Attempt
    """[.metadata parses by megatron's load after the caller read it, tensors read in place]."""
    fsyncs_in_write_stock: Attempt
    """[fsyncs inside megatron's write function, digest of the file it wrote]."""
    applied: list[str]
    """Process workarounds applied in this process."""
    expected: list[str]
    """Every process workaround of a CPU process."""
    reapply: list[str]
    """What a second application applied (nothing: they apply once)."""
    dynamo_disabled: bool


def _attempt(fn) -> Attempt:
    try:
        return Attempt(ok=True, value=fn())
    except Exception as error:  # noqa: BLE001 - we report which error class the call hits
        return Attempt(ok=False, error=f"{type(error).__name__}: {str(error)[:120]}")


def _checks():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.pipeline_parallel.bridge_communicator import BridgeCommunicator
    from megatron.core.utils import local_multi_tensor_l2_norm

    def l2_norm():  # device="cuda"
        norm, _ = local_multi_tensor_l2_norm(0, None, [[torch.tensor([3.0, 4.0])]], False)
        return [norm.device.type, norm.item()]

    def clip():  # type() == 'torch.cuda.FloatTensor', device='cuda'
        param = torch.nn.Parameter(torch.ones(2))
        param.grad = torch.full((2,), 2.0)
        clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
        return param.grad.tolist()

    def stream():  # every grad sync waits on the current stream
        torch.cuda.current_stream().wait_event(None)
        torch.cuda.synchronize()
        return "ok"

    def current_device():  # used as device= in grad buffers, bridge, attention
        return str(torch.empty(1, device=torch.cuda.current_device()).device)

    def bridge_group():  # BridgeCommunicator: backend='nccl'
        group = BridgeCommunicator._get_or_create_bridge_pg([0])
        return dist.get_backend(group)

    def dot_cuda():  # Tensor.cuda() is a no-op
        return str(torch.ones(1).cuda().device)

    def rng_tracker():  # tensor_parallel/random.py: CUDA generator states
        from megatron.core.tensor_parallel import random as mcore_random

        tracker = mcore_random.get_cuda_rng_tracker()
        tracker.reset()
        tracker.add("probe-stream", 4321)
        with tracker.fork("probe-stream"):
            inside = torch.rand(1).item()
        expected = torch.Generator().manual_seed(4321)
        return inside == torch.rand(1, generator=expected).item()

    def hybrid_final_norm():  # HybridStack always builds TENorm
        from megatron.core.models.hybrid import hybrid_block
        from megatron.core.transformer.transformer_config import TransformerConfig

        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                   normalization="RMSNorm", use_cpu_initialization=True)
        return type(hybrid_block.TENorm(config=config, hidden_size=8, eps=1e-5)).__name__

    def memory_buffer():  # attention reads the global memory buffer
        from megatron.core import parallel_state

        return type(parallel_state.get_global_memory_buffer()).__name__

    def save_queue():  # the first save would start a spawn-context Manager process
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if filesystem_async._results_queue is None:
            raise RuntimeError("no write-results queue: the first save would spawn a Manager")
        return type(filesystem_async._results_queue).__name__

    return {"memory_buffer": memory_buffer, "save_queue": save_queue, "l2_norm": l2_norm,
            "clip": clip, "stream": stream, "current_device": current_device,
            "bridge_group": bridge_group, "dot_cuda": dot_cuda, "rng_tracker": rng_tracker,
            "hybrid_final_norm": hybrid_final_norm}


def _view_written_in_place(alias: bool) -> bool:
    """Does megatron's writer keep a view of a bigger buffer as is (no copy in the loop)?"""
    import tempfile

    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_mimo.compat.mcore import views_saved_without_copy

    buffer = torch.arange(16.0)
    state = {"w": ShardedTensor.from_rank_offsets("w", buffer[4:12])}
    if alias:
        views_saved_without_copy(state)
    with tempfile.TemporaryDirectory() as directory:
        request = TorchDistSaveShardedStrategy().async_save(state, Path(directory), "mcore")
        [(_, _, (_, [(_, written)]))] = request.async_fn_args[1]
        return written.data_ptr() == buffer[4:12].data_ptr()


def _finalisation_group(own: bool) -> str:
    """The group an async save's finalisation gathers the write results over: 'default' for
    megatron's strategy, 'own' for ``save_strategy_finalised_on(group)``."""
    import tempfile

    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from torch.distributed.checkpoint.utils import _DistWrapper

    from megatron_mimo.compat.checkpointing import save_strategy_finalised_on

    group = dist.new_group(backend="gloo")
    strategy = save_strategy_finalised_on(group) if own else TorchDistSaveShardedStrategy()
    used = []
    gather = _DistWrapper.gather_object

    def recorded(self, obj):
        used.append(self.group)
        return gather(self, obj)

    with tempfile.TemporaryDirectory() as directory:
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0))}
        request = strategy.async_save(state, Path(directory), "mcore")  # plans on the default
        _DistWrapper.gather_object = recorded
        try:
            request.execute_sync()  # writes, then finalises
        finally:
            _DistWrapper.gather_object = gather
            dist.destroy_process_group(group)
    return "own" if used == [group] else "default" if used == [None] else repr(used)


def _metadata_reads(reuse: bool) -> list:
    """[.metadata parses during a load, tensors read in place]: the load through ``read_by``
    with our reader (given the metadata read before) or megatron's own strategy and reader."""
    import contextlib
    import tempfile

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_mimo.checkpoint.reader import readers
    from megatron_mimo.compat.checkpointing import read_by

    def state():
        return {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0))}

    reads, made = [], []
    parse = FileSystemReader.read_metadata

    def counted(self, *args, **kwargs):
        reads.append(1)
        return parse(self, *args, **kwargs)

    with tempfile.TemporaryDirectory() as directory:
        dist_checkpointing.save(state(), directory)
        torch.save({}, Path(directory) / "common.pt")  # as our saves: common state apart
        metadata = FileSystemReader(directory).read_metadata()

        def reader(path):
            made.append(readers(directory, metadata)(path))
            return made[-1]

        chosen = (read_by(reader) if reuse
                  else contextlib.nullcontext(TorchDistLoadShardedStrategy()))
        FileSystemReader.read_metadata = counted
        try:
            with chosen as strategy:
                dist_checkpointing.load(state(), directory, sharded_strategy=strategy)
        finally:
            FileSystemReader.read_metadata = parse
    return [len(reads), sum(r.in_place for r in made)]


def _fsyncs_in_write(unflushed: bool) -> list:
    """[fsync calls made while the shard file is written, xxh3 of the file]: megatron's write
    function, or ``write_unflushed`` (which leaves the flush to the caller)."""
    import os
    import tempfile

    import xxhash
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from megatron_mimo.compat.checkpointing import write_unflushed

    calls = []
    fsync = os.fsync

    def counted(descriptor):
        calls.append(descriptor)
        return fsync(descriptor)

    with tempfile.TemporaryDirectory() as directory:
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(64.0))}
        request = TorchDistSaveShardedStrategy().async_save(state, Path(directory), "mcore")
        os.fsync = counted
        try:
            if unflushed:
                assert isinstance(write_unflushed(request.async_fn, request.async_fn_args[1]), dict)
            else:
                request.async_fn(*request.async_fn_args)
        finally:
            os.fsync = fsync
        [shard] = Path(directory).glob("*.distcp")
        return [len(calls), xxhash.xxh3_128(shard.read_bytes()).hexdigest()]


def main() -> None:
    quiet_third_party()
    result_path = Path(sys.argv[2])
    dist.init_process_group("gloo")
    checks = _checks()
    before = {name: _attempt(fn) for name, fn in checks.items()}
    BridgeCommunicator = sys.modules["megatron.core.pipeline_parallel.bridge_communicator"].BridgeCommunicator
    BridgeCommunicator._bridge_pg_cache.clear()

    from megatron_mimo.compat import apply_process_workarounds, process_workarounds
    from megatron_mimo.compat.registry import applied
    from megatron_mimo.distributed.runtime import prepare_process, select_runtime

    prepare_process(select_runtime())
    after = {name: _attempt(fn) for name, fn in checks.items()}
    import torch._dynamo

    after["view_in_place"] = _attempt(lambda: _view_written_in_place(alias=True))
    after["finalisation_group"] = _attempt(lambda: _finalisation_group(own=True))
    after["metadata_reads"] = _attempt(lambda: _metadata_reads(reuse=True))
    after["fsyncs_in_write"] = _attempt(lambda: _fsyncs_in_write(unflushed=True))
    report = Report(
        before=before, after=after,
        view_in_place_without_alias=_attempt(lambda: _view_written_in_place(alias=False)),
        finalisation_group_stock=_attempt(lambda: _finalisation_group(own=False)),
        metadata_reads_stock=_attempt(lambda: _metadata_reads(reuse=False)),
        fsyncs_in_write_stock=_attempt(lambda: _fsyncs_in_write(unflushed=False)),
        applied=sorted(applied()),
        expected=sorted(w.name for w in process_workarounds(cpu=True)),
        reapply=apply_process_workarounds(cpu=True),
        dynamo_disabled=torch._dynamo.config.disable)
    result_path.write_text(json.dumps(encode(report)))
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
