"""Flow ``height-change``: several cycles' kept fragments → one dh/dt store.

plan (check each cycle store, list each parent's fragments) → output template
→ one task per parent (fit, write its chunk, record) in local worker
processes → consolidated metadata → per-parent table and summary. The
method is in :mod:`magg_core.height_change.dhdt`; the product in docs/height-change.md.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from magg.tasks.cells import CELL_TIMEOUT_S, cache_unless_proven
from magg.tasks.dispatch import run_windowed
from magg.tasks.height_change import (
    fit_parent_locally,
    plan_cycles,
    prepare_output,
    proven_fits,
    record_failed_parents,
    report_height_change,
)
from magg.tasks.report import consolidate_store, run_progress
from magg.tasks.setup import load_pipeline_config
from magg.tasks.workers import local_workers
from magg_core.errors import CellsFailedError
from magg_core.schema import FitOptions, HeightChangeRequest


@flow(name="height-change")
def height_change(
    cycles: list[int],
    output: str,
    stores: str | list[str] | None = None,
    config: str = "atl06",
    min_points: int = FitOptions.min_points,
    min_cycles: int = FitOptions.min_cycles,
    rejection_threshold: float = FitOptions.rejection_threshold,
    max_iterations: int = FitOptions.max_iterations,
    backend: Literal["local", "dask"] = "local",
    cells: list[str] | None = None,
    concurrency: int | None = None,
    dask_address: str | None = None,
    cell_timeout_s: int = CELL_TIMEOUT_S,
) -> dict[str, Any]:
    """Fit the rate of surface height change in every child cell across ``cycles``.

    Returns the run's summary. When any parent failed (a cycle lacks one of
    its fragments), raises :class:`~magg_core.errors.CellsFailedError` after
    every other parent has finished, so the run ends ``Failed`` and a retry
    re-fits only those parents.

    Parameters
    ----------
    cycles
        The ICESat-2 cycles to fit together (at least two; the fit needs
        ``min_cycles`` of them in a child).
    output
        The height-change store's URL (a path, ``file://`` or ``s3://``).
    stores
        The cycle stores: one pattern with ``{cycle}`` or one URL per cycle;
        default the config's ``output.store``. Each must have been run with
        ``keep_fragments`` and this config.
    config
        The cycles' pipeline config (a built-in name or a YAML path); it must
        have a ``height_change`` section.
    min_points, min_cycles, rejection_threshold, max_iterations
        The fit's :class:`~magg_core.height_change.dhdt.FitOptions`: the fewest points and
        distinct cycles a child needs, and the outlier-rejection rule. Run
        parameters, not config: changing them re-fits without touching the
        cycle stores.
    backend
        ``local``: worker processes on this machine, one per core; ``dask``:
        the workers of the Dask cluster at ``dask_address`` (they read the
        cycle stores and write the output with their own identity). Lambda and
        ECS are not offered for this flow yet.
    cells
        Fit only these parent cells (morton words).
    concurrency
        Parents in flight at once (default: one per core, or the Dask
        cluster's threads).
    dask_address
        The scheduler of an existing Dask cluster, for ``dask``.
    cell_timeout_s
        How long one parent may take.
    """
    logger = get_run_logger()
    started = time.monotonic()
    if backend not in ("local", "dask"):
        raise ValueError(f"height-change runs on backend local or dask, got {backend!r}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    options = FitOptions(
        min_points=min_points,
        min_cycles=min_cycles,
        rejection_threshold=rejection_threshold,
        max_iterations=max_iterations,
    )
    pipeline = load_pipeline_config(config)
    if stores is None:
        if pipeline.output.store is None:
            raise ValueError(f"config {pipeline.name!r} names no output.store: pass stores")
        stores = pipeline.output.store
    plan = plan_cycles(cycles, stores, pipeline)
    requests = plan.requests(output, options, cells)
    logger.info(
        "%d of %d parents to fit from cycles %s into %s (t0 %s)",
        len(requests),
        plan.parents.size,
        [c.cycle for c in plan.cycles],
        output,
        plan.epoch.isoformat(),
    )
    store_id = prepare_output(output, plan, options)
    fit_task = cache_unless_proven(fit_parent_locally, proven_fits(output, plan.config, requests))

    with (
        run_progress(0, len(requests)) as progress,
        local_workers(backend, concurrency, dask_address) as (workers, window),
    ):

        def fit(request: HeightChangeRequest) -> PrefectFuture:
            task = fit_task([request.parent_morton])
            return task.submit(request, store_id, cell_timeout_s, workers)

        results, failures = run_windowed(
            fit, requests, window, progress.cell_done, lambda r: [r.parent_morton]
        )
    if failures:
        record_failed_parents([r for r in requests if r.parent_morton in failures], failures)
    consolidate_store(output)
    summary = report_height_change(
        results, failures, plan, wall_s=time.monotonic() - started, output=output
    )
    if summary["failed_cells"]:
        raise CellsFailedError(
            f"{len(summary['failed_cells'])} of {len(requests)} parents failed: "
            + ", ".join(summary["failed_cells"][:10])
            + " — retry the flow run to re-fit only these parents",
            summary=summary,
        )
    return summary
