"""Boilerplate of a spawned test rank: parse args, init the world, run, write JSON, tear down."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.workers.contract import encode


def worker_main(body: Callable[[dict[str, Any]], Any]) -> None:
    """Run ``body(args)`` on this rank with torch.distributed up; its return value (dataclasses,
    see :mod:`tests.workers.contract`) becomes JSON."""
    from megatron_mimo.metrics.log import quiet_third_party

    quiet_third_party()
    from megatron_mimo.distributed.runtime import destroy_distributed, init_distributed

    args, result_path = json.loads(sys.argv[1]), Path(sys.argv[2])
    init_distributed()
    try:
        result = body(args)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)
    result_path.write_text(json.dumps(encode(result)))
    destroy_distributed()


GUARDED_GETTERS = (
    "get_tensor_model_parallel_group", "get_pipeline_model_parallel_group",
    "get_data_parallel_group", "get_context_parallel_group", "get_model_parallel_group",
    "get_tensor_and_data_parallel_group", "get_embedding_group", "get_position_embedding_group",
    "get_expert_model_parallel_group", "get_expert_tensor_parallel_group",
    "get_expert_data_parallel_group", "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size", "get_data_parallel_rank", "get_data_parallel_world_size",
    "get_pipeline_model_parallel_rank", "get_pipeline_model_parallel_world_size",
)


def forbid_parallel_state_groups() -> None:
    """Make every parallel_state group/rank getter raise, wherever it was imported to.

    Code that silently falls back to the global parallel_state (instead of the branch's
    explicit groups) then fails loudly in the test.
    """
    import sys as _sys

    from megatron.core import parallel_state

    originals = {name: getattr(parallel_state, name) for name in GUARDED_GETTERS}

    def make_guard(name):
        def guard(*args, **kwargs):
            raise RuntimeError(f"parallel_state.{name} called: a module fell back to global state")
        return guard

    guards = {name: make_guard(name) for name in GUARDED_GETTERS}
    for module in list(_sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("megatron"):
            continue
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                setattr(module, name, guards[name])
