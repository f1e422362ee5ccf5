"""Boilerplate of a spawned test rank: parse args, init the world, run, write JSON, tear down."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def worker_main(body: Callable[[dict[str, Any]], Any]) -> None:
    """Run ``body(args)`` on this rank with torch.distributed up; its return value becomes JSON."""
    from megatron_mimo.log import silence_known_warnings

    silence_known_warnings()
    from megatron_mimo.runtime import destroy_distributed, init_distributed

    args, result_path = json.loads(sys.argv[1]), Path(sys.argv[2])
    init_distributed()
    try:
        result = body(args)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)
    result_path.write_text(json.dumps(result))
    destroy_distributed()
