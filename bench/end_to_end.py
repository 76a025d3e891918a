"""End to end: the demo workload through ``process-cycle``, with and without S3 latency.

The workload is ``magg demo``'s: the built-in sample (12 granules near Dome C,
19 parent cells), its catalog, and the real flow on the ``local`` backend
against a real Prefect server (in its own process). It runs three times:

- ``local files``: granules and store on the local disk (what ``magg demo`` does);
- ``moto S3``: granules and store in moto (its own process), no added latency;
- ``moto S3 + 30 ms``: the same behind :mod:`bench.latency_proxy`, which adds
  30 ms to every request, about what S3 costs from Lambda in its region.

Reported per run: cells per second over the whole flow (template, cells,
consolidation and report included), and the mean per-cell time split into
read / aggregate / write as the cells themselves measured it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench._common import cached_sample, machine, parser, ratio_line
from bench.servers import CREDENTIALS, REGION, latency_proxy, moto_s3, upload

DELAY_MS = 30.0
DEMO_CYCLE = 22
IN_BUCKET, OUT_BUCKET = "magg-bench-granules", "magg-bench-stores"


def run_flow(catalog: Path, store: str, mirror: str, credentials: str) -> dict:
    from magg.flows.process_cycle import process_cycle

    started = time.perf_counter()
    summary = process_cycle(
        catalog=str(catalog), store=store, granule_mirror=mirror, credentials=credentials
    )
    summary["measured_s"] = time.perf_counter() - started
    if summary["failed_cells"] or summary["granules_failed"]:
        raise RuntimeError(f"the run had failures: {summary['markdown']}")
    return summary


def show(name: str, summary: dict) -> float:
    cells = summary["cells"]
    per_cell = {k: summary[f"{k}_s"] / cells * 1000 for k in ("read", "aggregate", "write")}
    rate = cells / summary["measured_s"]
    print(
        f"  {name:>16}: {cells} cells in {summary['measured_s']:5.1f} s = {rate:4.2f} cells/s; "
        f"per cell: read {per_cell['read']:6.0f} ms, aggregate {per_cell['aggregate']:4.0f} ms, "
        f"write {per_cell['write']:4.0f} ms ({summary['total_obs']:,} points)"
    )
    return rate


def point_at(endpoint_url: str) -> None:
    """Ambient AWS settings, as a worker's role and configuration would supply them."""
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint_url,
        AWS_REGION=REGION,
        AWS_ACCESS_KEY_ID=CREDENTIALS.access_key_id,
        AWS_SECRET_ACCESS_KEY=CREDENTIALS.secret_access_key,
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    sample_options = {"n_granules": 3, "extent_km": 200.0} if args.quick else {}
    work = Path(tempfile.mkdtemp(prefix="magg-bench-e2e-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    from magg_core.catalog.catalog import catalog_from_records

    print(f"end-to-end benchmark on {machine()}")
    granules = cached_sample(**sample_options)
    catalog = catalog_from_records([g.umm for g in granules], cycle=DEMO_CYCLE)
    catalog_path = catalog.write(work / "catalog.json")
    print(f"  demo workload: {len(granules)} granules, {len(catalog.cells)} cells")
    local_dir = str(granules[0].path.parent)

    with prefect_test_harness(server_startup_timeout=120):
        local = run_flow(catalog_path, str(work / "local.zarr"), local_dir, "none")
        with moto_s3() as s3:
            upload(s3.endpoint, IN_BUCKET, {f"granules/{g.name}": str(g.path) for g in granules})
            upload(s3.endpoint, OUT_BUCKET, {})
            mirror = f"s3://{IN_BUCKET}/granules"
            point_at(s3.endpoint.url)
            direct = run_flow(catalog_path, f"s3://{OUT_BUCKET}/direct.zarr", mirror, "environment")
            with latency_proxy(s3.endpoint, DELAY_MS) as slow:
                point_at(slow.endpoint.url)
                delayed = run_flow(
                    catalog_path, f"s3://{OUT_BUCKET}/delayed.zarr", mirror, "environment"
                )
    local_rate = show("local files", local)
    show("moto S3", direct)
    rate = show(f"moto S3 + {DELAY_MS:g} ms", delayed)
    ratio_line("end_to_end.cells_per_second_local", local_rate, None, unit=" cells/s")
    ratio_line("end_to_end.cells_per_second_s3_30ms", rate, None, unit=" cells/s")
    ratio_line("end_to_end.local_over_s3_30ms", local_rate / rate, None)


if __name__ == "__main__":
    main()
