"""Memory: peak RSS of one dense cell, ~5M good points from 500+ granules, as a worker runs it.

Near 88°S every ICESat-2 track bends along the latitude circles, so a cell
there sees hundreds of granules per cycle and millions of points. The
synthetic sample cannot place 500 distinct passes in one cell in one cycle
(at 85.6°S about 37 cross a 50 km disc), but ICESat-2 repeats its tracks
every cycle, so 14 cycles of the same 37 passes give 518 granules -- as a
multi-cycle product or a cell at the pole would.

The cell runs :func:`magg_core.grid.cell.process_cell` (read from local files,
aggregate, write to a local store) in a fresh process, as a Lambda or ECS
worker would, and reports that process's peak RSS: the figure a 2 GB
Lambda is billed and killed against. Target (docs/architecture.md §Targets): <= 1 GB.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import cached_sample, machine, parser, ratio_line

CENTRE = (-85.6327, 37.5)
"""The centre of an order-6 cell at 85.6°S (so the sample's disc lies inside it)."""
EXTENT_KM = 50.0
PASSES_PER_CYCLE = 37
"""Every pass of a cycle that crosses the disc."""
FULL_CYCLES = range(1, 15)
QUICK_CYCLES = range(1, 3)


def granule_paths(cycles: range, passes: int) -> list[str]:
    paths = []
    for cycle in cycles:
        sample = cached_sample(
            n_granules=passes, centre=CENTRE, extent_km=EXTENT_KM, cycle=cycle, seed=cycle
        )
        paths += [str(g.path) for g in sample]
    return paths


def _peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _run_cell(paths: list[str], parent: int, store: str, answer) -> None:
    """In a fresh process: the template, then the cell; reports peak RSS before and after."""
    from magg_core.config import load_config
    from magg_core.grid.cell import process_cell
    from magg_core.schema import CellRequest
    from magg_core.store.arrays import create_template, open_store

    config = load_config("atl06")
    create_template(open_store(store), config, [parent], {})
    before = _peak_rss_mb()
    request = CellRequest(
        parent_morton=parent,
        parent_order=6,
        child_order=12,
        granule_urls=tuple(paths),
        store_path=store,
        chunk_idx=0,
    )
    started = time.perf_counter()
    result = process_cell(request)
    answer.send(
        {
            "before_mb": before,
            "peak_mb": result.peak_rss_mb,
            "wall_s": time.perf_counter() - started,
            "points": result.total_obs,
            "processed": result.files_processed,
            "failed": len(result.files_failed),
            "timings": result.duration_s,
        }
    )


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    cycles, passes = (QUICK_CYCLES, 5) if args.quick else (FULL_CYCLES, PASSES_PER_CYCLE)
    print(f"memory benchmark on {machine()}")
    paths = granule_paths(cycles, passes)
    from magg_core.morton import parent_of, point_morton

    parent = int(parent_of(point_morton(np.array([CENTRE[0]]), np.array([CENTRE[1]]), 12), 6)[0])
    spawn = multiprocessing.get_context("spawn")  # a fresh process: its peak is the cell's alone
    with tempfile.TemporaryDirectory() as work:
        receive, send = spawn.Pipe(duplex=False)
        worker = spawn.Process(
            target=_run_cell, args=(paths, parent, str(Path(work) / "s.zarr"), send)
        )
        worker.start()
        report = receive.recv()
        worker.join()
    t = report["timings"]
    print(
        f"  cell {parent}: {report['points']:,} good points from {report['processed']} of "
        f"{len(paths)} granules ({report['failed']} failed)"
    )
    print(
        f"  {report['wall_s']:.1f} s: read {t.read:.1f} s, aggregate {t.aggregate:.2f} s, "
        f"write {t.write:.2f} s"
    )
    print(
        f"  peak RSS {report['peak_mb']:.0f} MB; {report['before_mb']:.0f} MB of it before the "
        f"cell started (interpreter, numpy, zarr, h5coro, obstore)"
    )
    ratio_line("memory.peak_rss", report["peak_mb"], 1024, at_least=False, unit=" MB")


if __name__ == "__main__":
    main()
