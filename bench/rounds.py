"""Figures over repeated rounds: the median and the min-max spread of each, as a table.

One-shot timings on a shared disk swing 2x between runs; a median over rounds that meet the same
page-cache and disk state says how one method compares with another, the spread how much to
trust it."""

import os
import platform
import statistics
from pathlib import Path


def summarize(rounds: list[dict], skip: tuple[str, ...] = ()) -> dict:
    """Median and min-max spread of every numeric figure (but ``skip``) over the rounds."""
    keys = [k for k, v in rounds[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip]
    return {k: {"median": statistics.median(r[k] for r in rounds),
                "min": min(r[k] for r in rounds), "max": max(r[k] for r in rounds)} for k in keys}


def print_table(rounds: list[dict], summary: dict) -> None:
    """One row per figure: each round, the median and the spread."""
    head = " | ".join(f"r{i + 1}" for i in range(len(rounds)))
    print(f"| figure | {head} | median | spread |")
    print("|---|" + "---|" * (len(rounds) + 2))
    for key, stats in summary.items():
        values = " | ".join(f"{r[key]:.2f}" for r in rounds)
        print(f"| {key} | {values} | **{stats['median']:.2f}** | "
              f"{stats['min']:.2f}-{stats['max']:.2f} |")


def machine() -> dict:
    """What the figures were measured on (the load average says how busy it was)."""
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {"cpus": os.cpu_count(), "mem_gb": int(mem) / 1e6, "python": platform.python_version(),
            "loadavg": os.getloadavg()}
