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
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


@dataclass
class ProcessUsage:
    """One process of a tree, as last read from ``/proc``."""

    parent: int
    command: str
    cpu_s: float
    """User and system CPU-seconds."""
    peak_rss_mb: float
    """Peak resident set size (``VmHWM``), MB."""


@dataclass
class TreeUsage:
    """What a command's process and its descendants used, by pid (:func:`run_measured`)."""

    processes: dict[int, ProcessUsage] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.processes.values())

    def children_of(self, command_part: str) -> list[ProcessUsage]:
        """The processes whose parent's command line contains ``command_part``."""
        parents = {pid for pid, p in self.processes.items() if command_part in p.command}
        return [p for p in self.processes.values() if p.parent in parents]


def read_tree(root: int, usage: TreeUsage) -> TreeUsage:
    """Read process ``root`` and its descendants from ``/proc`` (Linux) into ``usage``.

    Every process already in ``usage`` is read again, also after its parent ended
    and it was re-parented; one that has ended keeps its last reading.
    """
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = (
                    Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                )
            except OSError:  # ended meanwhile
                continue
    tree = set(usage.processes) | {root}
    grown = True
    while grown:
        more = {pid for pid, fields in stats.items() if int(fields[1]) in tree} - tree
        tree |= more
        grown = bool(more)
    for pid in tree & stats.keys():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            known = usage.processes.get(pid)
            line = Path(f"/proc/{pid}/cmdline").read_bytes() if known is None else b""
        except OSError:
            continue
        peak_kb = next(
            (int(row.split()[1]) for row in status.splitlines() if row.startswith("VmHWM:")), 0
        )
        fields = stats[pid]
        usage.processes[pid] = ProcessUsage(
            parent=int(fields[1]) if known is None else known.parent,
            command=line.replace(b"\0", b" ").decode(errors="replace")[:200]
            if known is None
            else known.command,
            cpu_s=(int(fields[11]) + int(fields[12])) / tick,  # utime + stime
            # a process ending has no VmHWM left to read: keep the last one
            peak_rss_mb=max(peak_kb / 1024, known.peak_rss_mb if known else 0.0),
        )
    return usage


def tree_cpu_seconds(root: int) -> float:
    """CPU-seconds process ``root`` and its descendants alive now have used (a server's)."""
    return read_tree(root, TreeUsage()).cpu_s


def run_measured(
    command: Sequence[str], interval_s: float = 0.05, **options: Any
) -> tuple[subprocess.CompletedProcess, TreeUsage]:
    """Run ``command`` to its end (``subprocess.run``'s ``options``, output captured as text);
    its result and the CPU-seconds and peak memory of its process and every descendant.

    Why not ``resource.getrusage(RUSAGE_CHILDREN)``: a process's CPU reaches its
    parent's count only when the parent waits for it, and ``magg`` ends without
    waiting for its worker processes' forkserver (10 of 23 CPU-seconds of a run
    went uncounted); nor does it say which process held the memory. The tree is
    read from ``/proc`` instead (Linux), every ``interval_s``; a process counts
    from its last reading, so up to ``interval_s`` of each process's CPU is
    missed, and so is a process that ends, or whose parent ends, before it is
    first read: an undercount. A descendant once read stays counted after its
    parent ends and it is re-parented.
    """
    usage = TreeUsage()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    )

    def poll(stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            read_tree(process.pid, usage)

    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(stop,), daemon=True)
    poller.start()
    try:
        stdout, stderr = process.communicate()
    finally:
        stop.set()
        poller.join()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done, usage


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
