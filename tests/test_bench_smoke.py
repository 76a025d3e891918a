"""Each benchmark runs from the repo root on tiny inputs and prints its ratio lines.

Benchmarks are not tests: nothing here looks at a time or a ratio's value
(the machine is shared, and ``--quick`` inputs are too small to mean
anything). This only keeps the scripts from rotting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"^ratio [\w.]+: \S+.*\((target [<>]= [^)]+|no target)\)", re.MULTILINE)
EQUAL = re.compile(r"^  equal: magg's store and the script's output, ([\d,]+) cells", re.MULTILINE)
"""bench.floor's line after it compared magg's store with the plain script's output."""
EXPECTED_RATIOS = {
    "statistics": 2,
    "read": 3,
    "orchestration": 1,
    "memory": 1,
    "end_to_end": 3,
    "cycle": 6,
    "levels": 4,
    "extract": 1,
}
"""bench.floor has a test of its own below (it also checks its equality lines)."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.mark.parametrize("name", sorted(EXPECTED_RATIOS))
def test_benchmark_runs_and_prints_its_ratios(name, cache):
    env = {**os.environ, "MAGG_BENCH_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert len(RATIO.findall(done.stdout)) == EXPECTED_RATIOS[name], done.stdout


def test_the_floor_benchmark_checks_magg_against_the_plain_script(cache):
    """bench.floor --quick: every run's outputs compared (it raises on a difference)."""
    env = {**os.environ, "MAGG_BENCH_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.floor", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    equal = EQUAL.findall(done.stdout)
    # local, local against a lasting server, S3 with the store on S3, S3 with the store on
    # local disk, one growth sample
    assert len(equal) == 5 and all(int(n.replace(",", "")) > 0 for n in equal), done.stdout
    assert len(RATIO.findall(done.stdout)) == 6, done.stdout


def test_cpu_of_a_process_tree_counts_descendants_nobody_waited_for():
    """bench.floor's CPU and memory figures: a grandchild orphaned by its parent, which
    never waits for it, still counts (``magg`` leaves its worker processes' forkserver so),
    and is found as its parent's child."""
    from bench._common import run_measured

    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
    # the parent lives on a while, as magg does beside its forkserver, then ends without waiting
    orphan = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
        "time.sleep(0.3)"
    )
    done, usage = run_measured([sys.executable, "-c", orphan])
    assert done.returncode == 0, done.stderr
    assert 0.5 <= usage.cpu_s < 3.0, usage.processes
    (orphaned,) = usage.children_of("subprocess.Popen")
    assert orphaned.cpu_s >= 0.5 and orphaned.peak_rss_mb > 1, orphaned
