"""Helpers shared by the benchmark scripts: machine description, peak RSS, result files.

Results carry the machine they were measured on (cores, load, versions) because the numbers mean
nothing without it: the development machine is a shared 2-core box.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def package_versions(*names: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine_info(*packages: str) -> dict[str, Any]:
    """Cores, memory, load, Python and package versions: what a reader needs to compare numbers."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "packages": package_versions("ehrflow", *packages),
    }
    try:
        with open("/proc/meminfo") as fh:
            total_kib = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
        info["memory_gib"] = round(total_kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        info["memory_gib"] = None
    return info


def write_result(name: str, payload: dict[str, Any], *, packages: tuple[str, ...] = ()) -> Path:
    """Write ``benchmarks/results/<name>.json`` with a UTC timestamp and the machine description."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(*packages),
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return path


def dot_row(ax: Any, row: int, values: Any) -> None:
    """One row of the benchmarks' dot plots: every value (a fold or a split) in grey, their mean as a blue diamond."""
    ax.scatter(values, [row] * len(values), color="0.6", s=16, zorder=2)
    ax.scatter([sum(values) / len(values)], [row], color="C0", marker="D", s=36, zorder=3)
