"""The save-then-resume worlds that test_checkpoint_resume and test_precision share.

Every case first trains 2N iterations straight and N iterations with a save (one world per world
size, cases in turn), then resumes in fresh processes (again one world per world size). A world
start costs ~10 s of imports and set-up on this machine, so the cases take 4 worlds, not two per case.
Each rank's result is a :class:`~tests.workers.ckpt_world.Saved` / ``Resumed`` (``Flags`` for
the load-flag runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.harness import run_world
from tests.workers.ckpt_layouts import TWO_RANKS
from tests.workers.ckpt_world import Flags, Probed, Resumed, Saved

WORKER = "tests.workers.ckpt_world"
A = "images_tp1dp2_language_tp2dp1"
B = "images_tp2dp1_language_tp1dp2"  # saves its optimizer state fully_reshardable
NEMOTRON = "nemotron_images_tp1dp2_language_tp2dp1"  # RADIO + Mamba hybrid (tiny_cpu_nemotron)
PP2 = "images_tp1dp2_language_pp2"  # language TP1xDP1xPP2, fully_reshardable
AV = "av_images_dp1_audio_dp2_language_tp1"  # three branches, fully_reshardable
AV_DP = "av_images_dp2_audio_dp1_language_tp1"  # the same, audio (and images) DP changed
PROBE_ONLY = (AV_DP,)
"""Cases that only load other cases' checkpoints (their probes): no save, no resume of their own."""
FULLY = {"checkpoint.dist_ckpt_optim_fully_reshardable": True}
ASYNC = {"checkpoint.async_save": True}
BF16 = {"precision.bf16": True}
FP16 = {"precision.fp16": True, "precision.initial_loss_scale": 256.0, "precision.hysteresis": 1,
        "precision.loss_scale_window": 2}
OVERFLOW_AT = 2
"""fp16 cases overflow on the images ranks at this iteration (inside warmup, before the save)."""

CASES: dict[str, tuple[str, int, dict[str, Any]]] = {  # name: (layout, ranks, overrides)
    A: (A, 4, {}),
    B: (B, 4, {**FULLY, **ASYNC}),
    TWO_RANKS: (TWO_RANKS, 2, ASYNC),
    NEMOTRON: (NEMOTRON, 4, {}),
    PP2: (PP2, 4, FULLY),
    "bf16_two_ranks": (TWO_RANKS, 2, BF16),
    "fp16_two_ranks": (TWO_RANKS, 2, FP16),
    "bf16_nemotron": (NEMOTRON, 4, BF16),
    AV: (AV, 4, FULLY),
    AV_DP: (AV_DP, 4, FULLY),
}
"""B and TWO_RANKS save in the background (--async-save): their resume tests cover async saves;
TWO_RANKS is also the fp32 run the precision cases compare with."""

FOREIGN = {A: {"other_layout": B, "from_pp2": PP2}, B: {"other_layout": A},
           PP2: {"from_pp1": B, "from_pp1_dp": A}, "bf16_two_ranks": {"fp32": TWO_RANKS},
           AV_DP: {"other_audio_dp": AV}}
"""Before resuming its own checkpoint, a case loads these others' (``Resumed.probes`` by probe
name): A loads B's fully_reshardable one (another TP/DP) and PP2's (language PP2 -> PP1), B loads
A's dp_reshardable one (refused at once), PP2 loads B's (PP1 -> PP2) and A's (a PP change under
dp_reshardable: refused), bf16 loads the fp32 one (refused: another precision's optimizer
state), AV_DP loads AV's (the audio branch's DP 2 -> 1, the images' 1 -> 2)."""


def _by_world_size(mode: str, root: Path, extra, more: dict[str, tuple[int, dict]] | None = None
                   ) -> dict[str, list[Any]]:
    """Run ``mode`` for every case, one world per world size; ``more``: further runs (name:
    (ranks, args)) appended to the world of their size."""
    groups: dict[int, list[str]] = {}
    for name, (_, ranks, _) in CASES.items():
        if mode == "resumed" or name not in PROBE_ONLY:
            groups.setdefault(ranks, []).append(name)
    for name, (ranks, _) in (more or {}).items():
        groups.setdefault(ranks, []).append(name)
    out: dict[str, list[Any]] = {}
    for ranks, names in groups.items():
        runs = [more[name][1] if name not in CASES else
                {"mode": mode, "layout": CASES[name][0], "root": str(root / name),
                 "overrides": CASES[name][2], **extra(name)} for name in names]
        results = run_world(WORKER, ranks, {"runs": runs}, timeout=120 * len(runs))
        for index, name in enumerate(names):
            out[name] = [rank[index] for rank in results]
    return out


REPEATED = "repeated_async_saves"
"""The run that saves in the background again and again (memory must not grow), in the
two-rank save world."""


def save_all(root: Path) -> dict[str, list[Saved]]:
    """Every case's straight run and its run until the save at N, per rank; and REPEATED."""
    repeated = {"mode": REPEATED, "root": str(root / REPEATED)}
    return _by_world_size("straight_and_saved", root, lambda name: {
        "inject_overflow_at": OVERFLOW_AT if name.startswith("fp16") else None},
        more={REPEATED: (2, repeated)})


def resume_all(root: Path) -> dict[str, list[Resumed | Probed | Flags]]:
    """Every case resumed in fresh processes (after its foreign probes), per rank. The bf16
    two-rank case also loads the fp32 weights with --finetune and --no-load-optim; "flags"
    loads the fp32 two-rank checkpoint with each --no-load-* flag and --finetune."""
    def extra(name: str) -> dict[str, Any]:
        foreign = {probe: str(root / other) for probe, other in FOREIGN.get(name, {}).items()}
        more = {"finetune_root": str(root / TWO_RANKS), "no_load_optim_probe": True} \
            if name == "bf16_two_ranks" else {}
        return {"foreign_roots": foreign, "probe_only": name in PROBE_ONLY, **more}

    flags = {"mode": "flags", "root": str(root / TWO_RANKS)}
    return _by_world_size("resumed", root, extra, more={"flags": (2, flags)})
