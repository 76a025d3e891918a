"""Pyramid levels: what ``output.levels: [6..12]`` costs a cell, the assembly and the store.

The demo sample's cells are processed one after another in this process into
two local stores, one with the built-in config (levels 6..12) and one with
the same config without ``levels`` (order 12 only), alternating store by
store ``--repeats`` times; the medians of the per-cell times that
:class:`magg_core.schema.Timings` records are compared (aggregate: the
statistics, once per level; write: the chunks plus, with levels, the staging
object). Also reported: the assembly of the coarse levels and the bytes each
store holds (arrays of the coarse groups, staging objects). Local files, not
S3: the numbers are CPU and bytes, not round trips. No target: the price is
reported for docs/levels.md.

Second, the levels' statistics of one dense parent (``--points`` track-ordered
points, as :mod:`bench.statistics` makes them): all orders from one sort
(:func:`magg_core.stats.levels.level_statistics`, what a cell runs) against the
design before it, one :func:`magg_core.stats.aggregate.aggregate` per order on the
shifted positions -- compared byte for byte, then timed in CPU time of this
thread.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import cached_sample, machine, median_time, parser, ratio_line
from bench.statistics import track
from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import PipelineConfig, load_config
from magg_core.grid.assembly import assemble_levels
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import plan_cells
from magg_core.stats.aggregate import aggregate
from magg_core.stats.levels import level_statistics
from magg_core.store.arrays import create_template, open_store
from magg_core.store.staging import LEVELS_PREFIX


def run_store(granules, catalog, config: PipelineConfig, url: str) -> dict[str, float]:
    store = open_store(url)
    create_template(store, config, catalog.parents, {"bench": True})
    mirror = str(Path(granules[0].path).parent)
    results = [process_cell(r) for r in plan_cells(catalog, config, url, granule_mirror=mirror)]
    t0 = time.perf_counter()
    assemble_levels(store, config)
    assembly = time.perf_counter() - t0
    with_data = [r for r in results if r.total_obs]
    return {
        "aggregate": statistics.median(r.duration_s.aggregate for r in with_data),
        "write": statistics.median(r.duration_s.write for r in with_data),
        "total": statistics.median(r.duration_s.total for r in with_data),
        "assembly": assembly,
        "cells": len(with_data),
        "points": statistics.median(r.total_obs for r in with_data),
    }


def per_order(child, columns, config: PipelineConfig) -> dict[int, dict[str, np.ndarray]]:
    """The baseline: one :func:`aggregate` (one sort) per order, as cells did before."""
    child_order = config.output.child_order
    return {
        order: aggregate(
            child >> (2 * (child_order - order)),
            columns,
            config,
            n_children=config.output.cells_per_parent(order),
        )
        for order in config.output.orders
    }


def one_sort_against_per_order(config: PipelineConfig, n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    child = track(rng, n)
    columns = {
        "h_li": (3000.0 + rng.normal(0.0, 5.0, n)).astype(np.float32),
        "h_li_sigma": rng.uniform(0.02, 0.5, n).astype(np.float32),
    }
    cpu = time.thread_time
    ours_s, ours = median_time(lambda: level_statistics(child, columns, config), repeats, cpu)
    base_s, base = median_time(lambda: per_order(child, columns, config), repeats, cpu)
    for order, stats in base.items():
        for name, values in stats.items():
            assert ours[order][name].tobytes() == values.tobytes(), (order, name)
    print(
        f"  {n:,} track points, orders {config.output.orders[0]}..{config.output.orders[-1]}: "
        f"one sort {ours_s * 1e3:.0f} ms, one per order {base_s * 1e3:.0f} ms (byte-identical)"
    )
    return base_s / ours_s


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--points", type=int, default=3_000_000)
    args = p.parse_args(argv)
    options = {"n_granules": 2, "extent_km": 100.0} if args.quick else {}
    repeats = 1 if args.quick else args.repeats
    granules = cached_sample(**options)
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    levels = load_config("atl06")
    raw = levels.to_dict()
    del raw["output"]["levels"]
    plain = load_config(raw)
    print(f"levels benchmark on {machine()}")
    print(f"  {len(granules)} granules, {len(catalog.parents)} parent cells; medians per cell")

    runs: dict[str, list[dict[str, float]]] = {"levels": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="magg-bench-levels-") as tmp:
        for i in range(repeats):
            for name, config in (("plain", plain), ("levels", levels)):
                url = str(Path(tmp) / f"{name}-{i}.zarr")
                runs[name].append(run_store(granules, catalog, config, url))
        root = Path(tmp) / "levels-0.zarr"
        coarse = sum(tree_bytes(root / str(k)) for k in levels.output.orders[:-1])
        staging = tree_bytes(root / LEVELS_PREFIX)
        child = tree_bytes(root / str(levels.output.child_order))

    med = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in runs.items()
    }
    for name, m in med.items():
        print(
            f"  {name:>6}: {m['cells']:.0f} cells with data, ~{m['points']:,.0f} points each; "
            f"aggregate {m['aggregate'] * 1e3:.0f} ms, write {m['write'] * 1e3:.0f} ms, "
            f"cell total {m['total'] * 1e3:.0f} ms; assembly {m['assembly'] * 1e3:.0f} ms"
        )
    print(
        f"  bytes: order-12 group {child:,}, coarse groups 6..11 {coarse:,}, "
        f"staging objects {staging:,}"
    )
    ratio_line("levels.cell_total", med["levels"]["total"] / med["plain"]["total"], None)
    ratio_line("levels.aggregate", med["levels"]["aggregate"] / med["plain"]["aggregate"], None)
    ratio_line("levels.extra_bytes", (coarse + staging) / child, None)
    n = 30_000 if args.quick else args.points
    ratio_line("levels.one_sort_speedup", one_sort_against_per_order(levels, n, repeats), None)


if __name__ == "__main__":
    main()
