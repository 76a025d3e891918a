"""Cycle scale: two stages (each granule read once) against one (each cell reads its granules).

The sample is cycle-like: long tracks (up to 2,000 km) converging toward
the pole around 80°S, so each granule crosses many order-6 parents, as real
Antarctic granules cross 25-32. Both ways run end to end through the real
``process-cycle`` flow on a real Prefect server, side by side:

- ``one stage`` (the design before, kept here only as the baseline): a
  bench-only flow whose cell tasks run :func:`magg_core.grid.cell.process_cell`
  on the flow's threads, each cell reading its own rows of every granule it
  touches;
- ``two stages``: ``process-cycle`` on the local backend (extracts, then
  cells from fragments, in worker processes).

Each with granules on local files and on moto behind 30 ms of added latency
per request. Reported: bytes the extracts fetched (as the reader's driver
counts them) against the compressed bytes of the datasets used (the target:
each byte once, <= 1.2x), fragment bytes written (and read back once), wall
time ratio (target >= 8x), and cores busy (CPU time of the whole process
tree over wall time, target >= 1.8).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import h5py
import psutil

from bench._common import cached_sample, machine, parser, ratio_line
from bench.end_to_end import point_at
from bench.servers import CREDENTIALS, latency_proxy, moto_s3, upload

DELAY_MS = 30.0
USED = ("latitude", "longitude", "h_li", "h_li_sigma", "atl06_quality_summary")
IN_BUCKET, OUT_BUCKET = "magg-cycle-granules", "magg-cycle-stores"
SAMPLE = {"n_granules": 40, "centre": (-80.0, 0.0), "extent_km": 2000.0, "spacing_m": 100.0}
QUICK = {"n_granules": 3, "centre": (-80.0, 0.0), "extent_km": 400.0, "spacing_m": 200.0}


class CoreMeter:
    """CPU seconds of this process and all its descendants, sampled while work runs.

    Worker processes come and go (a pool per run); each one's last sample
    counts, so CPU of processes that exited between samples is lost -- the
    figure errs low.
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            self.seen[process.pid] = times.user + times.system

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> CoreMeter:
        self._sample()
        self.start = dict(self.seen)
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self.t0

    @property
    def cores(self) -> float:
        cpu = sum(t - self.start.get(pid, 0.0) for pid, t in self.seen.items())
        return cpu / self.wall_s


def stored_bytes(paths: list[Path]) -> int:
    """Compressed bytes of the datasets a run needs, summed over granules and beams."""
    total = 0
    for path in paths:
        with h5py.File(path) as f:
            for beam in (b for b in f if b.startswith("gt")):
                group = f[f"{beam}/land_ice_segments"]
                total += sum(group[name].id.get_storage_size() for name in USED if name in group)
    return total


def one_stage_flow(credentials):
    """The design before two stages, as a flow: cells on threads, each reading its granules.

    Its parameters name the inputs; the credentials stay in this process (a
    flow parameter would be stored by the server).
    """
    from prefect import flow, task
    from prefect.cache_policies import NONE
    from prefect.task_runners import ThreadPoolTaskRunner

    from magg_core.catalog.catalog import load_catalog
    from magg_core.config import load_config
    from magg_core.grid.cell import process_cell
    from magg_core.grid.plan import plan_cells

    @task(cache_policy=NONE)
    def cell(request):
        return process_cell(replace(request, s3_credentials=credentials))

    @flow(name="bench-one-stage", task_runner=ThreadPoolTaskRunner(max_workers=4))
    def run(catalog_path: str, store: str, mirror: str) -> int:
        config, catalog = load_config(), load_catalog(catalog_path)
        requests = plan_cells(catalog, config, store, granule_mirror=mirror)
        return sum(f.result().total_obs for f in [cell.submit(r) for r in requests])

    return run


def run_both(catalog_path: Path, mirror: str, store_root: str) -> dict:
    from magg.flows.process_cycle import process_cycle
    from magg_core.catalog.catalog import load_catalog
    from magg_core.config import load_config
    from magg_core.store.arrays import create_template, open_store

    config = load_config()
    catalog = load_catalog(catalog_path)
    figures = {}

    store = f"{store_root}/one-stage.zarr"
    create_template(open_store(store), config, catalog.parents, {"bench": True})
    credentials = CREDENTIALS if mirror.startswith("s3://") else None
    with CoreMeter() as meter:
        obs = one_stage_flow(credentials)(str(catalog_path), store, mirror)
    figures["one"] = {"wall_s": meter.wall_s, "cores": meter.cores, "obs": obs}

    with CoreMeter() as meter:
        summary = process_cycle(
            catalog=str(catalog_path),
            store=f"{store_root}/two-stage.zarr",
            granule_mirror=mirror,
            credentials="environment" if mirror.startswith("s3://") else "none",
        )
    figures["two"] = {
        "wall_s": meter.wall_s,
        "cores": meter.cores,
        "fetched": summary["extract_bytes_fetched"],
        "fragments": summary["fragment_bytes_written"],
        "obs": summary["total_obs"],
    }
    if figures["one"]["obs"] != figures["two"]["obs"]:
        raise RuntimeError(f"the two ways disagree: {figures}")
    one, two = (_arrays(f"{store_root}/{name}.zarr") for name in ("one-stage", "two-stage"))
    differ = [name for name in one if one[name].tobytes() != two[name].tobytes()]
    if differ:
        raise RuntimeError(f"the two ways wrote different bytes in {differ}")
    print("  the two stores are byte-identical")
    return figures


def _arrays(url: str) -> dict:
    import zarr

    from magg_core.store.arrays import open_store

    group = zarr.open_group(open_store(url, read_only=True), path="12", mode="r")
    return {name: array[:] for name, array in group.arrays()}


def report(name: str, key: str, figures: dict, needed: int) -> None:
    one, two = figures["one"], figures["two"]
    print(
        f"  {name}: one stage {one['wall_s']:.1f} s ({one['cores']:.2f} cores), "
        f"two stages {two['wall_s']:.1f} s ({two['cores']:.2f} cores); "
        f"{two['obs']:,} points"
    )
    ratio_line(f"cycle.two_over_one_stage_speed_{key}", one["wall_s"] / two["wall_s"], 8.0)
    ratio_line(f"cycle.cores_busy_{key}", two["cores"], 1.8, unit=" cores")
    ratio_line(
        f"cycle.bytes_fetched_over_datasets_used_{key}",
        two["fetched"] / needed,
        1.2,
        at_least=False,
    )
    print(
        f"  {name}: fragments written {two['fragments'] / 1e6:.1f} MB and read back once "
        f"({two['fragments'] / max(two['obs'], 1):.1f} bytes a point)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    print(machine())
    granules = cached_sample(**(QUICK if args.quick else SAMPLE))
    paths = [g.path for g in granules]
    needed = stored_bytes(paths)

    from magg_core.catalog.catalog import catalog_from_records

    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    crossings = sum(len(gs) for gs in catalog.cells.values()) / len(granules)
    print(
        f"  sample: {len(granules)} granules, {len(catalog.cells)} cells, "
        f"{crossings:.1f} cells per granule, {needed / 1e6:.1f} MB of datasets used"
    )
    work = Path(tempfile.mkdtemp(prefix="magg-bench-cycle-"))
    catalog_path = catalog.write(work / "catalog.json")

    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        figures = run_both(catalog_path, str(paths[0].parent), str(work))
        report("local files", "local", figures, needed)
        with moto_s3() as s3:
            upload(s3.endpoint, IN_BUCKET, {f"ATL06/{p.name}": str(p) for p in paths})
            upload(s3.endpoint, OUT_BUCKET, {})
            with latency_proxy(s3.endpoint, DELAY_MS) as slow:
                point_at(slow.endpoint.url)
                figures = run_both(catalog_path, f"s3://{IN_BUCKET}/ATL06", f"s3://{OUT_BUCKET}")
                report(f"moto + {DELAY_MS:.0f} ms", "s3_30ms", figures, needed)


if __name__ == "__main__":
    main()
