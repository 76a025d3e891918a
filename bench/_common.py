"""What every benchmark shares: timing, reporting, the machine, cached samples.

Benchmarks compare two ways of doing the same work *in the same run*: this
machine is shared (2 cores, other jobs), so only ratios measured side by
side, repeated and reduced to medians, mean anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MAGG_BENCH_CACHE", Path(tempfile.gettempdir()) / "magg-bench-cache"))
"""Generated samples, kept between runs: writing hundreds of granules takes minutes."""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny inputs: checks the script runs")
    return p


def median_time(
    fn: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, Any]:
    """Median time of ``repeats`` calls (wall time unless ``clock`` says otherwise), and
    the last call's result.

    ``clock=time.thread_time`` measures the CPU this thread spent: for
    single-threaded work on a shared machine it does not count the time
    other jobs held the cores.
    """
    times, result = [], None
    for _ in range(repeats):
        t0 = clock()
        result = fn()
        times.append(clock() - t0)
    return statistics.median(times), result


def ratio_line(
    name: str, value: float, target: float | None, *, at_least: bool = True, unit: str = "x"
) -> str:
    """The line a benchmark prints per result: ``ratio NAME: 9.1x (target >= 8x) met``.

    ``target=None`` for a figure that has no target (it is reported, not judged).
    """
    if target is None:
        line = f"ratio {name}: {value:.3g}{unit} (no target)"
    else:
        met = value >= target if at_least else value <= target
        sign = ">=" if at_least else "<="
        verdict = "met" if met else "MISSED"
        line = f"ratio {name}: {value:.3g}{unit} (target {sign} {target:g}{unit}) {verdict}"
    print(line, flush=True)
    return line


def machine() -> str:
    """One line describing where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
        f"numpy {np.__version__}, load average {load:.1f}"
    )


def cached_sample(**options: Any) -> list:
    """``write_sample(**options)`` once per distinct options; later calls reuse the files.

    The granules' CMR records are stored beside them, so a cached sample comes
    back exactly as :func:`magg_core.granules.sample.write_sample` returned it.
    """
    from magg_core.granules.sample import SampleGranule, write_sample

    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    directory = CACHE / f"sample-{key}"
    index = directory / "records.json"
    if not index.exists():
        shutil.rmtree(directory, ignore_errors=True)
        t0 = time.perf_counter()
        granules = write_sample(directory / "granules", **options)
        print(f"  (generated {len(granules)} granules in {time.perf_counter() - t0:.0f} s, cached)")
        records = [{"name": g.name, "umm": g.umm} for g in granules]
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        tmp.rename(index)  # last: a crash mid-way leaves no index, so it is regenerated
    records = json.loads(index.read_text())
    return [
        SampleGranule(name=r["name"], path=directory / "granules" / r["name"], umm=r["umm"])
        for r in records
    ]
