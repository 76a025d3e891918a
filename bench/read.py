"""Read concurrency and read efficiency on one 40-granule cell behind 30 ms of S3 latency.

Setup: synthetic ATL06 granules (:mod:`magg_core.granules.sample`) in a moto S3 server,
reached through :mod:`bench.latency_proxy`, which adds 30 ms to every request
(about what a ranged GET costs from Lambda to S3 in the same region). Both run
in child processes, so this process runs the reader alone.

Measured, on the same cell and in the same run:

- ``read_granules`` as a cell runs it (its default concurrency) against the
  same function reading one granule at a time (``max_workers=1``); target
  >= 8x (docs/architecture.md §Targets);
- requests and bytes fetched for the cell, against the compressed size of
  the chunks a reader cannot avoid: every chunk of every beam's latitude and
  longitude (ATL06 has no spatial index, so finding the cell's rows means
  reading all coordinates) plus the chunks of the variables and the quality
  flag that hold the cell's rows; target <= 1.5x.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from bench._common import cached_sample, machine, median_time, parser, ratio_line
from bench.servers import CREDENTIALS, Server, latency_proxy, moto_s3, range_server, upload
from magg_core import morton
from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import PipelineConfig, load_config
from magg_core.granules.read import read_granules
from magg_core.granules.sample import SampleGranule
from magg_core.schema import GranulePoints

FULL = {"granules": 40, "sample": {"n_granules": 130, "extent_km": 600.0, "seed": 7}}
QUICK = {"granules": 4, "sample": {"n_granules": 6, "extent_km": 250.0, "seed": 7}}
BUCKET = "magg-bench-read"
DELAY_MS = 30.0


def busiest_cell(
    granules: list[SampleGranule], n: int, config: PipelineConfig
) -> tuple[int, list[SampleGranule]]:
    """The parent crossed by the most granules, and ``n`` of those granules."""
    catalog = catalog_from_records(
        [g.umm for g in granules], cycle=22, parent_order=config.output.parent_order
    )
    parent = max(catalog.cells, key=lambda p: (len(catalog.cells[p]), p))
    names = {g.name for g in catalog.cells[parent]}
    crossing = [g for g in granules if g.name in names]
    if len(crossing) < n:
        raise RuntimeError(f"the busiest cell has {len(crossing)} granules, need {n}")
    return int(parent), crossing[:n]


def unavoidable_bytes(granule: SampleGranule, parent: int, config: PipelineConfig) -> int:
    """Compressed bytes of the chunks any reader of this parent must fetch (see module doc)."""
    source = config.data_source
    variables = (*source.variables, source.quality.dataset)
    total = 0
    with h5py.File(granule.path, "r") as f:
        for beam in source.beams:
            group = source.beam_group(beam)
            if group not in f:
                continue
            g = f[group]
            words = morton.point_morton(
                g[source.latitude][:], g[source.longitude][:], config.output.child_order
            )
            inside = morton.parent_of(words, config.output.parent_order) == np.uint64(parent)
            rows = np.flatnonzero(inside)
            for name in (source.latitude, source.longitude):
                total += _chunk_bytes(g[name], None)
            if rows.size:
                total += sum(_chunk_bytes(g[name], rows) for name in variables)
    return total


def _chunk_bytes(dset: h5py.Dataset, rows: np.ndarray | None) -> int:
    total = 0
    for i in range(dset.id.get_num_chunks()):
        info = dset.id.get_chunk_info(i)
        first = info.chunk_offset[0]
        if rows is None or np.any((rows >= first) & (rows < first + dset.chunks[0])):
            total += info.size
    return total


@dataclass(frozen=True)
class Timing:
    serial_s: float
    concurrent_s: float
    no_latency_s: float
    server_cpu_s: float
    """The server's CPU per concurrent read."""
    reader_cpu_s: float
    """This process's CPU per concurrent read."""
    points: list[GranulePoints]


def measure(server: Server, urls: list[str], parent: int, repeats: int) -> Timing:
    """Read the cell through the latency proxy concurrently and one granule at a time."""
    config = load_config("atl06")
    with latency_proxy(server.endpoint, DELAY_MS) as slow:

        def run(endpoint, **options):
            points, failures = read_granules(
                urls, parent, config, credentials=CREDENTIALS, endpoint=endpoint, **options
            )
            if failures:
                raise RuntimeError(f"read failed: {failures[0]}")
            return points

        run(slow.endpoint)  # warm up: connections, imports
        server_cpu, reader_cpu = server.cpu_seconds(), time.process_time()
        concurrent_s, points = median_time(lambda: run(slow.endpoint), repeats)
        server_cpu = (server.cpu_seconds() - server_cpu) / repeats
        reader_cpu = (time.process_time() - reader_cpu) / repeats
        serial_s, _ = median_time(lambda: run(slow.endpoint, max_workers=1), repeats)
        no_latency_s, _ = median_time(lambda: run(server.endpoint), repeats)
    return Timing(serial_s, concurrent_s, no_latency_s, server_cpu, reader_cpu, points)


def report(name: str, t: Timing, n_granules: int) -> None:
    requests = sum(p.requests for p in t.points)
    print(f"  {name}:")
    print(
        f"    one granule at a time {t.serial_s:6.2f} s ({t.serial_s / n_granules * 1000:.0f} ms "
        f"a granule, ~{t.serial_s / n_granules / (DELAY_MS / 1000):.0f} latencies' worth)"
    )
    print(f"    concurrent            {t.concurrent_s:6.2f} s")
    print(f"    concurrent, no proxy  {t.no_latency_s:6.2f} s")
    print(
        f"    CPU per concurrent read: reader {t.reader_cpu_s:.2f} s, "
        f"server {t.server_cpu_s:.2f} s ({t.server_cpu_s / requests * 1000:.2f} ms a request)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    size = QUICK if args.quick else FULL
    repeats = 1 if args.quick else 3
    config = load_config("atl06")
    print(f"read benchmark on {machine()}")
    parent, granules = busiest_cell(cached_sample(**size["sample"]), size["granules"], config)
    keys = {f"ATL06/{g.name}": g.path for g in granules}
    urls = [f"s3://{BUCKET}/{key}" for key in keys]
    print(f"cell {parent}: {len(urls)} granules, {DELAY_MS:g} ms added to every request")

    with moto_s3() as moto:
        upload(moto.endpoint, BUCKET, {k: str(p) for k, p in keys.items()})
        on_moto = measure(moto, urls, parent, repeats)
    with tempfile.TemporaryDirectory() as root:
        for key, path in keys.items():
            (Path(root) / BUCKET / key).parent.mkdir(parents=True, exist_ok=True)
            (Path(root) / BUCKET / key).symlink_to(path)
        with range_server(Path(root)) as lean:
            on_lean = measure(lean, urls, parent, repeats)

    points = on_moto.points
    requests = sum(p.requests for p in points)
    fetched = sum(p.bytes_fetched for p in points)
    needed = sum(unavoidable_bytes(g, parent, config) for g in granules)
    print(f"  {sum(len(p) for p in points):,} good points in the cell")
    print(f"  requests: {requests:,} ({requests / len(urls):.1f} a granule)")
    print(f"  bytes fetched: {fetched / 1e6:.2f} MB; unavoidable chunks: {needed / 1e6:.2f} MB")
    report("moto S3 (its own process)", on_moto, len(urls))
    report("bench.range_server (no server CPU to speak of)", on_lean, len(urls))
    bound = on_moto.serial_s / on_moto.server_cpu_s
    print(
        f"  moto answers on one core (the GIL): no reader can read this cell from it "
        f"more than {bound:.1f}x faster than one granule at a time"
    )
    ratio_line("read.speedup_moto", on_moto.serial_s / on_moto.concurrent_s, 8, at_least=True)
    ratio_line(
        "read.speedup_range_server", on_lean.serial_s / on_lean.concurrent_s, 8, at_least=True
    )
    ratio_line("read.bytes_over_chunks", fetched / needed, 1.5, at_least=False)


if __name__ == "__main__":
    main()
