"""Orchestration overhead: 2,000 no-op cells (and their extracts) through ``process-cycle``.

What runs is the real flow (``flows.process_cycle``) on the ``local``
backend, talking to a real Prefect server in its own process (Prefect's
test harness: uvicorn + SQLite). Every extract is a real task run, and the
cells run in real task runs of at most 32 groups (``tasks/cells.py``), with
everything Prefect does for them -- cache keys, retry policy, persisted
results, state changes sent to the server, the windowed dispatch, the
progress artifact.

What does *not* run is the work: the extract (read a granule, store its
fragments) and the cell (aggregate, write one chunk) are replaced, in this
process only, by a function that returns an ``ok`` result at once, and the
worker processes by threads of this process. That is the "no-op": with it,
the time per task is what orchestration costs. Each cell has its own granule,
so a run of N cells is 2N tasks. The store's template for all cells is still
created, and the run still consolidates and reports; those are reported
apart, as they are paid once per run, not per task.

Measured: seconds per task while tasks run (first extract started to last
cell finished, divided by the tasks), the whole flow's time, and how long
after the flow returns the server shows every cell's task run completed.
Target (docs/architecture.md §Targets): <= 30 ms per task.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from bench._common import machine, parser, ratio_line

ORDER_1_CELLS = ((-80.0, 20.0), (-80.0, 110.0))
"""Two order-1 cells (by a point inside each) whose 2 x 1,024 order-6 children are the parents."""


WINDOW = 4
"""Tasks in flight: what the local backend keeps on a 4-core machine."""


def write_catalog(path: Path, n_cells: int) -> Path:
    """A catalog of ``n_cells`` order-6 parents, one (never read) granule each."""
    import mortie
    import numpy as np

    from magg_core.catalog.catalog import Catalog, CatalogGranule
    from magg_core.morton import children

    lat, lon = np.array(ORDER_1_CELLS).T
    coarse = mortie.clip2order(1, mortie.geo2mort(lat, lon, order=18))
    parents = sorted(int(p) for c in coarse for p in children(int(c), 6))[:n_cells]
    cells = {}
    for i, parent in enumerate(parents):
        name = f"ATL06_20240101000000_{i % 1387 + 1:04d}2210_007_01.h5"
        cells[parent] = (CatalogGranule(name=name, s3=f"s3://bench-unread/{i}/{name}", https=None),)
    metadata = {"short_name": "ATL06", "version": "007", "cycle": 22, "parent_order": 6}
    return Catalog(metadata=metadata, cells=cells).write(path)


class NoOpWork:
    """Stands in for the extract and the cell: answers ``ok`` at once and notes when they ran."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: float | None = None
        self.last: float | None = None
        self.calls = 0

    def __call__(self, request, *_: object, **__: object):
        from magg_core.schema import CellResult, ExtractRequest, ExtractResult

        if isinstance(request, list):  # the cells a worker process grids at once
            return [self(r) for r in request]

        now = time.perf_counter()
        with self.lock:
            self.first = now if self.first is None else self.first
            self.last = now
            self.calls += 1
        if isinstance(request, ExtractRequest):
            return ExtractResult(url=request.granule_url, status="ok", parents=1)
        return CellResult(
            parent_morton=request.parent_morton,
            status="ok",
            granule_count=len(request.granule_urls),
            files_processed=len(request.granule_urls),
        )


def completed_cell_runs(flow_run_id) -> int:
    """Cells whose task run the server shows as completed for this flow run (a task run
    of a group counts its cells: ``cells-{first}+{others}``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    done = TaskRunFilter(
        name=TaskRunFilterName(like_="cell"),
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED])),
    )
    count, cells, page = 0, 0, 200
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=done,
                limit=page,
                offset=count,
            )
            count += len(runs)
            cells += sum(1 + int(r.name.partition("+")[2] or 0) for r in runs)
            if len(runs) < page:
                return cells


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=2000, help="cells in the run (default 2000)")
    args = p.parse_args(argv)
    n_cells = 40 if args.quick else args.cells
    work = Path(tempfile.mkdtemp(prefix="magg-bench-orchestration-"))
    # Prefect reads its settings when first imported.
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from concurrent.futures import ThreadPoolExecutor

    from prefect.testing.utilities import prefect_test_harness

    import magg.tasks.cells
    import magg.tasks.extract
    import magg.tasks.workers
    from magg.flows.process_cycle import process_cycle

    print(f"orchestration benchmark on {machine()}")
    catalog = write_catalog(work / "catalog.json", n_cells)
    cells = NoOpWork()
    # The seams (see the module doc): the work, and the processes it would run in.
    magg.tasks.cells.process_cells_within = magg.tasks.extract.extract_granule = cells
    magg.tasks.workers.worker_pool = ThreadPoolExecutor

    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        print(f"  Prefect server started in {time.perf_counter() - t0:.1f} s")
        start = time.perf_counter()
        state = process_cycle(
            catalog=str(catalog),
            store=str(work / "store.zarr"),
            backend="local",
            credentials="none",
            concurrency=WINDOW,
            return_state=True,
        )
        returned = time.perf_counter()
        if not state.is_completed() or cells.calls != 2 * n_cells:
            raise RuntimeError(
                f"flow ended {state.name} after {cells.calls} of {2 * n_cells} tasks"
            )
        flow_run_id = state.state_details.flow_run_id
        while (shown := completed_cell_runs(flow_run_id)) < n_cells:
            if time.perf_counter() - returned > 600:
                raise RuntimeError(f"the server shows {shown} of {n_cells} cells after 10 min")
            time.sleep(0.5)
        visible = time.perf_counter()

    phase = cells.last - cells.first
    per_task = phase / cells.calls
    print(f"  {n_cells:,} no-op cells and {n_cells:,} no-op extracts, {WINDOW} in flight")
    print(f"  flow run: {returned - start:.1f} s in all")
    print(f"    before the first task (config, catalog, template): {cells.first - start:.1f} s")
    print(f"    extracts and cells: {phase:.1f} s, {per_task * 1000:.1f} ms a task")
    print(f"    after the last cell (consolidate, report): {returned - cells.last:.1f} s")
    print(
        f"  the server showed every cell's task run completed {visible - returned:.1f} s after "
        f"the flow returned ({visible - start:.1f} s after it started)"
    )
    ratio_line("orchestration.ms_per_task", per_task * 1000, 30, at_least=False, unit=" ms")


if __name__ == "__main__":
    main()
