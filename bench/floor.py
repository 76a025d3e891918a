"""The floor: ``magg run`` against a plain numpy script doing the same job, side by side.

The script (:func:`floor_run`) is what a user could write in an afternoon,
and the baseline issue 18 measures magg against: h5py reads each granule's
five datasets, healpy assigns order-12 nested cells (on authalic latitude,
as magg and tests/oracle.py do), one process per core reads granules, one
process per core aggregates parents -- ``np.lexsort`` then ``np.add.reduceat``
for count, min, max, the 1/σ²-weighted mean, σ, the population variance and
the linearly interpolated quartiles, at order 12 and at the config's coarser
levels -- and writes one ``.npz`` per parent. Its output is checked equal to
magg's store (:func:`check_equal`: every level, every non-empty cell) before
any time is reported.

Runs, in this order, each printing medians and the ratio magg / script
(``--rounds N`` sets the rounds of the first two, 3 by default):

- ``local``: the issue's real density (24 granules, tracks up to 2,000 km
  converging toward 80°S, a segment every 20 m), local files, rounds
  alternating which goes first;
- ``s3_30ms``: granules on moto behind 30 ms a request
  (:mod:`bench.latency_proxy`); magg reads them and writes its store there,
  the script reads them through s3fs (h5py's ros3 driver is not built here)
  and writes its ``.npz`` files locally;
- ``s3_30ms_store_local``: the same granules, magg's store on local disk
  where the script writes its output, so that both move the same bytes over
  S3 (the row above adds magg's fragments, chunks and records going to S3).
- ``local_lasting_server``: ``local`` with magg against a lasting Prefect server
  (``prefect server start``, started before the rounds; ``PREFECT_API_URL``), the
  setup for a cycle: no temporary server to start;
- ``growth``: 24 (the medians of ``local``), 48 and 96 granules, time per
  point for both;

Each run also prints CPU-seconds (the script's processes; ``magg run``'s whole process
tree, its temporary server and worker processes included; on S3, moto's and the
latency proxy's apart) and the largest peak RSS of magg's worker processes beside the
points of the largest parent cell: docs/performance.md §17.

magg runs as a user runs it: the ``magg run`` console script, local backend,
an ephemeral Prefect server, a fresh store each round, and one Prefect home
whose database is created before the first timed run (a user's first run on a
machine pays that once: 6–15 s here).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bench._common import (
    REPO,
    TreeUsage,
    cached_sample,
    machine,
    parser,
    ratio_line,
    run_measured,
    tree_cpu_seconds,
)
from bench.servers import CREDENTIALS, REGION, latency_proxy, moto_s3, upload
from tests.deploy_support import PrefectServer

SAMPLE = {"centre": (-80.0, 0.0), "extent_km": 2000.0, "spacing_m": 20.0}
GROWTH = (24, 48, 96)
QUICK = {"centre": (-80.0, 0.0), "extent_km": 300.0, "spacing_m": 100.0}
QUICK_GROWTH = (2, 4)
ROUNDS, QUICK_ROUNDS = 3, 1
DELAY_MS = 30.0
IN_BUCKET, OUT_BUCKET = "magg-floor-granules", "magg-floor-stores"
PARENT_ORDER, CHILD_ORDER = 6, 12
FILL = np.float32(3.4028235e38)
STATISTICS = ("count", "h_min", "h_max", "h_mean", "h_sigma", "h_variance")
QUARTILES = {"h_q25": 0.25, "h_q50": 0.5, "h_q75": 0.75}


# --- the plain script ----------------------------------------------------------------


def _open(source: str, s3: dict | None):
    import h5py

    if s3 is None:
        return h5py.File(source, "r")
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3["key"],
        secret=s3["secret"],
        client_kwargs={"endpoint_url": s3["endpoint"], "region_name": REGION},
    )
    return h5py.File(fs.open(source, "rb"), "r")


def read_granule(
    job: tuple[str, tuple[int, ...]], s3: dict | None = None
) -> dict[int, tuple[np.ndarray, ...]]:
    """Parent id → (order-12 cell ids, h, σ) of the granule's good points in the parents
    the catalog lists it under (``job``: the granule and those parents' nested ids).

    The catalog defines the job for both: a granule is gridded into the cells
    whose catalog entry names it, as magg's extract reads it.
    """
    source, wanted = job
    import healpy
    import mortie

    lat, lon, h, sigma = [], [], [], []
    with _open(source, s3) as f:
        for beam in (b for b in f if b.startswith("gt")):
            g = f[f"{beam}/land_ice_segments"]
            hb, sb = g["h_li"][:], g["h_li_sigma"][:]
            good = (
                (g["atl06_quality_summary"][:] == 0)
                & np.isfinite(hb)
                & np.isfinite(sb)
                & (hb != FILL)
                & (sb != FILL)
                & (sb > 0)
            )
            lat.append(g["latitude"][:][good])
            lon.append(g["longitude"][:][good])
            h.append(hb[good])
            sigma.append(sb[good])
    if not h:
        return {}
    cells = healpy.ang2pix(
        2**CHILD_ORDER,
        np.concatenate(lon),
        mortie.geodetic_to_authalic(np.concatenate(lat)),
        nest=True,
        lonlat=True,
    ).astype(np.int64)
    h, sigma = np.concatenate(h), np.concatenate(sigma)
    parents = cells >> 2 * (CHILD_ORDER - PARENT_ORDER)
    listed = np.isin(parents, np.asarray(wanted, dtype=np.int64))
    cells, h, sigma, parents = cells[listed], h[listed], sigma[listed], parents[listed]
    order = np.argsort(parents, kind="stable")
    ids, starts = np.unique(parents[order], return_index=True)
    bounds = np.r_[starts, order.size]
    return {
        int(p): (cells[order[a:b]], h[order[a:b]], sigma[order[a:b]])
        for p, a, b in zip(ids, bounds[:-1], bounds[1:], strict=True)
    }


def statistics_of(keys: np.ndarray, h: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Per distinct key: the cell ids and the statistics, one sort and ``reduceat`` each."""
    order = np.lexsort((h, keys))
    k, hs, ws = keys[order], h[order], w[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    count = np.diff(np.r_[starts, k.size])
    last = starts + count - 1
    sw = np.add.reduceat(ws, starts)
    mean = np.add.reduceat(hs, starts) / count
    out = {
        "cells": k[starts],
        "count": count,
        "h_min": hs[starts],
        "h_max": hs[last],
        "h_mean": np.add.reduceat(ws * hs, starts) / sw,
        "h_sigma": 1.0 / np.sqrt(sw),
        "h_variance": np.add.reduceat((hs - np.repeat(mean, count)) ** 2, starts) / count,
    }
    for name, q in QUARTILES.items():
        position = (count - 1) * q
        below = np.floor(position).astype(np.int64)
        t = position - below
        a, b = hs[starts + below], hs[np.minimum(starts + below + 1, last)]
        # numpy's linear interpolation, as its quantile computes it
        out[name] = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    return out


def aggregate_parent(parent: int, parts: list, levels: tuple[int, ...], out: str) -> int:
    """All levels of one parent from its points, written as one ``.npz``; returns its points."""
    cells = np.concatenate([p[0] for p in parts])
    h = np.concatenate([p[1] for p in parts]).astype(np.float64)
    w = 1.0 / np.concatenate([p[2] for p in parts]).astype(np.float64) ** 2
    arrays = {}
    for order in levels:
        for name, values in statistics_of(cells >> 2 * (CHILD_ORDER - order), h, w).items():
            arrays[f"{name}_{order}"] = values
    np.savez(Path(out) / f"{parent}.npz", **arrays)
    return int(cells.size)


def floor_run(
    sources: list[tuple[str, tuple[int, ...]]], out: Path, levels: tuple[int, ...], s3: dict | None
) -> int:
    """The whole script: read in one pool, aggregate in another; returns the points."""
    out.mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() or 1
    context = get_context("spawn")
    by_parent: dict[int, list] = {}
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for found in pool.map(read_granule, sources, [s3] * len(sources)):
            for parent, part in found.items():
                by_parent.setdefault(parent, []).append(part)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(aggregate_parent, p, parts, levels, str(out))
            for p, parts in by_parent.items()
        ]
        return sum(f.result() for f in futures)


# --- magg, and the check ---------------------------------------------------------------


PREFECT_HOME = Path(tempfile.mkdtemp(prefix="magg-bench-floor-prefect-"))
"""The Prefect home of every timed ``magg run``: one for the whole benchmark, as a user's
``~/.prefect`` is, its database created once before any timing (:func:`warm_prefect_home`)."""


def _magg_environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(PREFECT_HOME),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def warm_prefect_home() -> float:
    """Create the Prefect database of :data:`PREFECT_HOME` (untimed); the seconds it took.

    A user's first run on a machine creates it (6–15 s here), and every later
    run finds it: the rounds measure the runs a user makes every cycle.
    """
    t0 = time.perf_counter()
    command = [str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"]
    done = subprocess.run(command, env=_magg_environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prefect server database upgrade failed:\n{done.stderr}")
    return time.perf_counter() - t0


def magg_run(
    catalog: Path, store: str, mirror: str, work: Path, credentials: str, api_url: str | None
) -> TreeUsage:
    """``magg run`` as a user types it, in its own process (:data:`PREFECT_HOME`); what
    it used, with its temporary server (none with ``api_url``, a lasting server's API),
    forkserver and worker processes."""
    env = {**_magg_environment(), **({"PREFECT_API_URL": api_url} if api_url else {})}
    command = [
        str(Path(sys.executable).parent / "magg"),
        "run",
        "--catalog",
        str(catalog),
        "--store",
        store,
        "--backend",
        "local",
        "--credentials",
        credentials,
        "--granule-mirror",
        mirror,
    ]
    done, usage = run_measured(command, env=env, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"magg run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return usage


def workers_peak_rss_mb(usage: TreeUsage) -> float:
    """The largest peak RSS of magg's worker processes (the forkserver's children), MB."""
    return max((p.peak_rss_mb for p in usage.children_of("multiprocessing.forkserver")), default=0)


def largest_cell_points(store_path: str, parent_order: int) -> int:
    """Points of the store's largest parent cell: the maximum count at the parent order."""
    import zarr

    from magg_core.store.arrays import open_store

    store = open_store(store_path, read_only=True)
    return int(zarr.open_array(store, path=f"{parent_order}/count", mode="r")[:].max())


def waited_cpu_s() -> float:
    """CPU-seconds of this process and of the children it waited for (the script's pools)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


MOVED_AT_MOST = 1e-5
"""Share of points the two cell assignments may place in different cells: healpy on
authalic latitude (the script) and mortie (magg) agree on 99.9999 % of points, the
others lie on cell edges (docs/architecture.md §Grid); ten times that is allowed."""


def check_equal(store_path: str, out: Path, levels: tuple[int, ...]) -> tuple[int, int]:
    """magg's store equals the script's output at every level.

    Returns the cells compared and the points the two cell assignments place
    differently (counted at the finest order). Cells whose counts agree have
    the same statistics: counts, minima and maxima exactly (the float32
    values as stored), the others to float32 rounding (their sums run in
    another order). Cells whose counts differ (an edge point assigned to a
    neighbour) are left out, as long as they hold at most
    :data:`MOVED_AT_MOST` of the points.

    Raises
    ------
    AssertionError
        Naming the level and the statistic that differ.
    """
    import zarr

    from magg_core.store.arrays import open_store

    files = [np.load(path) for path in sorted(out.glob("*.npz"))]
    compared = moved = 0
    for order in levels:
        group = zarr.open_group(open_store(store_path, read_only=True), path=str(order), mode="r")
        count = group["count"][:]
        filled = count > 0
        cells = group["cell_ids"][:][filled].astype(np.int64)
        theirs = np.concatenate([f[f"cells_{order}"] for f in files])
        their_count = np.concatenate([f[f"count_{order}"] for f in files])
        _, mine, their = np.intersect1d(cells, theirs, return_indices=True)
        my_count = count[filled].astype(np.int64)
        same = my_count[mine] == their_count[their]
        apart = np.abs(my_count[mine] - their_count[their]).sum()
        apart += (
            my_count.sum() - my_count[mine].sum() + their_count.sum() - their_count[their].sum()
        )
        total = int(their_count.sum())
        # each point placed apart is counted twice: out of one cell, into another
        assert apart <= 2 * max(1.0, MOVED_AT_MOST * total), (
            f"order {order}: {apart // 2} of {total} points in other cells"
        )
        if order == levels[0]:
            moved = int(apart // 2)
        mine, their = mine[same], their[same]
        for name in (*STATISTICS, *QUARTILES):
            got = group[name][:][filled][mine]
            want = np.concatenate([f[f"{name}_{order}"] for f in files])[their]
            message = f"order {order}: {name}"
            if name in ("count", "h_min", "h_max"):
                np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=message)
            else:
                np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=message)
        compared += int(same.sum())
    return compared, moved


# --- rounds ----------------------------------------------------------------------------


def side_by_side(
    sources,
    catalog,
    mirror,
    store_root,
    work,
    levels,
    rounds,
    s3=None,
    servers=(),
    servers_name="moto and the latency proxy",
    api_url=None,
) -> dict:
    """``rounds`` of both, alternating which goes first; the first round's outputs checked.

    Returns the median wall time of each (``script``, ``magg``), its median CPU-seconds
    (``script_cpu``, ``magg_cpu``: the script's processes, and magg's with its temporary
    server and worker processes), the points gridded, the largest peak RSS of magg's
    worker processes over the rounds (``workers_mb``) and the points of the largest
    parent cell (``largest_cell``). The CPU-seconds that the processes ``servers`` (pids;
    ``servers_name``: moto and the latency proxy, or a lasting Prefect server, on the
    same cores) spent for each are printed apart. ``api_url``: magg runs against that
    Prefect API.
    """
    times: dict[str, list[float]] = {"script": [], "magg": []}
    cpu: dict[str, list[float]] = {"script": [], "magg": []}
    served: dict[str, list[float]] = {"script": [], "magg": []}
    points = largest = 0
    workers_mb = 0.0
    for r in range(rounds):
        out = work / f"floor-{r}"
        store = f"{store_root}/magg-{r}.zarr"

        script = partial(floor_run, sources, out, levels, s3)
        credentials = "environment" if s3 else "none"
        magg = partial(magg_run, catalog, store, mirror, work, credentials, api_url)
        for name, fn in (("script", script), ("magg", magg))[:: 1 if r % 2 == 0 else -1]:
            t0, c0 = time.perf_counter(), waited_cpu_s()
            s0 = sum(map(tree_cpu_seconds, servers))
            result = fn()
            times[name].append(time.perf_counter() - t0)
            served[name].append(sum(map(tree_cpu_seconds, servers)) - s0)
            if name == "script":
                points = result
                cpu[name].append(waited_cpu_s() - c0)
            else:
                cpu[name].append(result.cpu_s)
                workers_mb = max(workers_mb, workers_peak_rss_mb(result))
        if r == 0:
            largest = largest_cell_points(store, PARENT_ORDER)
            cells, moved = check_equal(store, out, levels)
            print(
                f"  equal: magg's store and the script's output, {cells:,} cells at orders "
                f"{', '.join(map(str, levels))}, {points:,} points ({moved} on cell edges "
                "assigned to a neighbour by healpy or mortie)"
            )
        shutil.rmtree(out, ignore_errors=True)
        if not store.startswith("s3://"):
            shutil.rmtree(store, ignore_errors=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {f"{name}_cpu": statistics.median(c) for name, c in cpu.items()}
    print(
        f"  script {', '.join(f'{t:.1f}' for t in times['script'])} s (median "
        f"{medians['script']:.1f}); magg run {', '.join(f'{t:.1f}' for t in times['magg'])} s "
        f"(median {medians['magg']:.1f})"
    )
    print(
        f"  CPU-seconds: script {', '.join(f'{c:.1f}' for c in cpu['script'])} (median "
        f"{cpu_medians['script_cpu']:.1f}); magg run {', '.join(f'{c:.1f}' for c in cpu['magg'])} "
        f"(median {cpu_medians['magg_cpu']:.1f})"
    )
    if servers:
        print(
            f"  CPU-seconds of {servers_name}: for the script "
            f"{', '.join(f'{c:.1f}' for c in served['script'])}, for magg run "
            f"{', '.join(f'{c:.1f}' for c in served['magg'])}"
        )
    print(
        f"  magg's worker processes: peak RSS {workers_mb:.0f} MB at most; "
        f"the largest parent cell holds {largest:,} points"
    )
    return {
        **medians,
        **cpu_medians,
        "points": points,
        "workers_mb": workers_mb,
        "largest_cell": largest,
    }


def jobs(catalog, where: dict[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """Each granule (``where``: name → path or key) and the nested ids of its catalog's cells."""
    import mortie

    listed: dict[str, list[int]] = {name: [] for name in where}
    for parent, granules in catalog.cells.items():
        nested, _ = mortie.mort2healpix(np.array([parent], dtype=np.uint64))
        for granule in granules:
            listed[granule.name].append(int(nested[0]))
    return [(where[name], tuple(parents)) for name, parents in listed.items()]


def sample_for(n: int, quick: bool) -> tuple[list, object, Path, Path]:
    from magg_core.catalog.catalog import catalog_from_records

    granules = cached_sample(n_granules=n, **(QUICK if quick else SAMPLE))
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    work = Path(tempfile.mkdtemp(prefix=f"magg-bench-floor-{n}-"))
    print(
        f"  sample: {n} granules, {len(catalog.cells)} cells, "
        f"{sum(g.path.stat().st_size for g in granules) / 1e6:.0f} MB of granules"
    )
    return granules, catalog, catalog.write(work / "catalog.json"), work


def main(argv: list[str] | None = None) -> None:
    cli = parser(__doc__.split("\n\n")[0])
    cli.add_argument(
        "--rounds", type=int, help=f"rounds of local and S3 runs (default {ROUNDS}, quick 1)"
    )
    args = cli.parse_args(argv)
    from magg_core.config import load_config

    config = load_config()
    levels = (CHILD_ORDER, *sorted(o for o in config.output.levels if o != CHILD_ORDER))
    growth = QUICK_GROWTH if args.quick else GROWTH
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    print(machine())
    print(f"Prefect database created in {warm_prefect_home():.1f} s (once, before timing)")

    print(f"local files, {rounds} rounds alternating:")
    granules, listing, catalog, work = sample_for(growth[0], args.quick)
    sources = jobs(listing, {g.name: str(g.path) for g in granules})
    local = side_by_side(
        sources, catalog, str(granules[0].path.parent), str(work), work, levels, rounds
    )
    ratio_line("floor.magg_over_script_local", local["magg"] / local["script"], 1.2, at_least=False)
    # What the wall time leaves out: the cores each left idle (docs/performance.md §17).
    ratio_line("floor.cpu_magg_over_script_local", local["magg_cpu"] / local["script_cpu"], None)

    print(f"local files, magg against a lasting Prefect server, {rounds} rounds alternating:")
    # `prefect server start` with its default services and its own home, as tests/ run it
    server = PrefectServer(Path(tempfile.mkdtemp(prefix="magg-bench-floor-server-"))).start()
    try:
        lasting = side_by_side(
            sources,
            catalog,
            str(granules[0].path.parent),
            str(work),
            work,
            levels,
            rounds,
            servers=(server.pid,),
            servers_name="the lasting Prefect server",
            api_url=server.api_url,
        )
    finally:
        server.stop()
    ratio_line(
        "floor.magg_over_script_local_lasting_server",
        lasting["magg"] / lasting["script"],
        1.2,
        at_least=False,
    )

    print(f"moto S3 + {DELAY_MS:.0f} ms a request, {rounds} rounds alternating:")
    granules, listing, catalog, work = sample_for(growth[0], args.quick)
    environment = dict(os.environ)
    with moto_s3() as s3:
        upload(s3.endpoint, IN_BUCKET, {f"ATL06/{g.name}": str(g.path) for g in granules})
        upload(s3.endpoint, OUT_BUCKET, {})
        with latency_proxy(s3.endpoint, DELAY_MS) as slow:
            from bench.end_to_end import point_at

            point_at(slow.endpoint.url)
            access = {
                "endpoint": slow.endpoint.url,
                "key": CREDENTIALS.access_key_id,
                "secret": CREDENTIALS.secret_access_key,
            }
            sources = jobs(listing, {g.name: f"{IN_BUCKET}/ATL06/{g.name}" for g in granules})
            remote = side_by_side(
                sources,
                catalog,
                f"s3://{IN_BUCKET}/ATL06",
                f"s3://{OUT_BUCKET}/{work.name}",
                work,
                levels,
                rounds,
                access,
                servers=(s3.pid, slow.pid),
            )
            print(f"moto S3 + {DELAY_MS:.0f} ms, magg's store on local disk, {rounds} rounds:")
            local_store = side_by_side(
                sources,
                catalog,
                f"s3://{IN_BUCKET}/ATL06",
                str(work),
                work,
                levels,
                rounds,
                access,
                servers=(s3.pid, slow.pid),
            )
    ratio_line(
        "floor.magg_over_script_s3_30ms", remote["magg"] / remote["script"], 1.2, at_least=False
    )
    ratio_line(
        "floor.magg_over_script_s3_30ms_store_local",
        local_store["magg"] / local_store["script"],
        1.2,
        at_least=False,
    )
    os.environ.clear()
    os.environ.update(environment)

    print(f"growth ({growth[0]} granules: the medians above; then one round each):")
    per_point = {}
    for n in growth:
        if n == growth[0]:
            got = local
        else:
            granules, listing, catalog, work = sample_for(n, args.quick)
            sources = jobs(listing, {g.name: str(g.path) for g in granules})
            mirror = str(granules[0].path.parent)
            got = side_by_side(sources, catalog, mirror, str(work), work, levels, 1)
        per_point[n] = {k: got[k] / got["points"] * 1e9 for k in ("script", "magg")}
        print(
            f"  {n:>3} granules, {got['points']:,} points: script {per_point[n]['script']:.0f} "
            f"ns/point, magg {per_point[n]['magg']:.0f} ns/point, ratio "
            f"{got['magg'] / got['script']:.2f}; magg's workers at most "
            f"{got['workers_mb']:.0f} MB, largest cell {got['largest_cell']:,} points"
        )
    first, last = per_point[growth[0]], per_point[growth[-1]]
    ratio_line(
        f"floor.magg_time_per_point_{growth[-1]}_over_{growth[0]}",
        last["magg"] / first["magg"],
        1.2,
        at_least=False,
    )


if __name__ == "__main__":
    main()
