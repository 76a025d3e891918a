"""Flow ``process-cycle``: one ICESat-2 cycle (or date range) into one gridded store.

credentials → catalog → store template → extract every granule once (fragments
per cell it crosses) → grid every cell from its fragments, both stages on the
chosen backend → coarse pyramid levels (if the config has any) → consolidated
metadata → per-cell table, summary and cost estimate.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from magg.tasks.cells import (
    CELL_TIMEOUT_S,
    cache_unless_proven,
    grid_cell_on_lambda,
    grid_cells_locally,
    proven_parents,
)
from magg.tasks.credentials import open_credentials
from magg.tasks.dispatch import in_groups, run_windowed
from magg.tasks.ecs import grid_cell_on_ecs
from magg.tasks.extract import (
    extract_locally,
    extract_on_ecs,
    extract_on_lambda,
    record_failed_extracts,
)
from magg.tasks.lambda_backend import lambda_client, lambda_concurrency
from magg.tasks.report import (
    assemble_store_levels,
    consolidate_store,
    record_failed_cells,
    remove_fragments,
    report_run,
    run_progress,
)
from magg.tasks.setup import (
    check_store,
    load_pipeline_config,
    prepare_store,
    query_catalog,
    read_catalog,
)
from magg.tasks.workers import local_workers
from magg_core.errors import CellsFailedError
from magg_core.grid.plan import (
    check_cell_timeout,
    check_mirror,
    plan_cells,
    plan_extracts,
    store_url_for,
)
from magg_core.schema import CellRequest, ExtractRequest
from magg_core.store.staging import staged_orders

Backend = Literal["local", "dask", "lambda", "ecs"]
CredentialsMode = Literal["earthdata", "environment", "none"]

ECS_CONCURRENCY = 200


@flow(name="process-cycle")
def process_cycle(
    cycle: int | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
    region: str = "antarctica",
    catalog: str | None = None,
    config: str = "atl06",
    store: str | None = None,
    backend: Backend = "local",
    cells: list[str] | None = None,
    max_cells: int | None = None,
    dry_run: bool = False,
    credentials: CredentialsMode = "earthdata",
    concurrency: int | None = None,
    cell_timeout_s: int = CELL_TIMEOUT_S,
    cmr_url: str | None = None,
    granule_mirror: str | None = None,
    lambda_function: str = "magg-process-cell",
    lambda_memory_mb: int = 2048,
    lambda_architecture: Literal["arm64", "x86_64"] = "arm64",
    aws_credentials_block: str | None = None,
    ecs_deployment: str = "process-cell/ecs",
    credentials_block: str = "magg-nsidc-s3-credentials",
    accept_partial: bool = False,
    keep_fragments: bool = False,
    ecs_extract_deployment: str = "extract-granule/ecs",
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Grid one cycle's ATL06 granules into a HEALPix Zarr store.

    Returns the run's summary. When any cell failed or is partial (some of
    its granules could not be read), raises
    :class:`~magg_core.errors.CellsFailedError` (carrying the same summary)
    after every other cell has finished, so the run ends ``Failed`` and the
    Prefect UI's Retry re-runs only those cells. Incomplete cells are never
    cached: a new run after the inputs are repaired recomputes exactly them.

    Parameters
    ----------
    cycle, start_date, end_date
        What to process: an ICESat-2 cycle, or an explicit date range.
    region
        A named region (``antarctica``, ``greenland``) or a GeoJSON file.
    catalog
        A catalog file from ``magg catalog``; skips the CMR query.
    config
        The pipeline config: a built-in name or a YAML path.
    store
        Output store URL (``{cycle}`` is filled in); defaults to the config's
        ``output.store``.
    backend
        ``local`` (worker processes here, one per core), ``dask`` (the workers
        of the Dask cluster at ``dask_address``), ``lambda`` (the deployed
        function) or ``ecs`` (child flow runs of the ``extract-granule`` and
        ``process-cell`` deployments).
    cells, max_cells
        Process only these parent cells (morton words) / only the first N.
    dry_run
        Log in and plan the cells, report them, write nothing and run no cell.
    credentials
        ``earthdata`` (NSIDC S3 credentials via Earthdata login, refreshed
        before they expire), ``environment`` (plain AWS credentials) or
        ``none`` (local files, public buckets).
    concurrency
        Granules or cells in flight at once (default: one worker process per
        core for local, 200 ECS; for Lambda the
        ``magg-lambda`` global concurrency limit, which this sets when given
        and creates at 1,000 when missing).
    cell_timeout_s
        How long one cell may take, at most 900 s. For ``lambda`` this must be
        the deployed function's timeout: the client waits that long (plus a
        margin) for an answer rather than retrying a cell that is still running.
    cmr_url
        CMR search root (default: NASA's production CMR).
    granule_mirror
        Read granules from ``{granule_mirror}/{name}`` (a directory or bucket
        of copies) instead of NSIDC's bucket.
    lambda_function, lambda_memory_mb, lambda_architecture
        The deployed function's name, memory and architecture (the last two
        price the run's Lambda cost estimate, whatever the backend).
    aws_credentials_block
        A prefect-aws ``AwsCredentials`` block for invoking Lambda.
    ecs_deployment, credentials_block
        The ``process-cell`` deployment for ``ecs`` and the Secret block
        through which its runs receive the S3 credentials.
    accept_partial
        Write the statistics of partial cells from the granules that could be
        read, and end the run ``Completed`` if no cell failed outright: for a
        run where a granule is known to be bad upstream. Partial cells stay
        ``partial`` in the records, the table and the summary, and are still
        recomputed by the next run.
    keep_fragments
        Keep the extract stage's fragments (``fragments/`` in the store) after
        a complete run, for later runs that add granules or for height change
        across cycles. They are always kept while a cell is incomplete, so a
        retry re-reads only granules whose extract failed. With a config that
        has a ``height_change`` section, only such a run's fragments carry each
        point's latitude, longitude and time (24 more bytes a point, float64
        each), which the height-change flow fits; otherwise they hold the
        child index and the variables (10 bytes a point for ATL06).
    ecs_extract_deployment
        The ``extract-granule`` deployment for ``ecs``.
    dask_address
        The scheduler of an existing Dask cluster for ``dask``, e.g.
        ``tcp://login1:8786`` (dask-jobqueue on SLURM/PBS prints it).
    """
    logger = get_run_logger()
    started = time.monotonic()
    check_cell_timeout(cell_timeout_s)
    check_mirror(granule_mirror, backend)
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    pipeline = load_pipeline_config(config)
    source = open_credentials(credentials)

    if catalog:
        cell_catalog = read_catalog(catalog)
    else:
        cell_catalog = query_catalog(
            cycle, start_date, end_date, region, pipeline.output.parent_order, cmr_url
        )
    store_path = store_url_for(pipeline, cell_catalog, store)
    requests = plan_cells(
        cell_catalog,
        pipeline,
        store_path,
        cells=cells,
        max_cells=max_cells,
        granule_mirror=granule_mirror,
        accept_partial=accept_partial,
    )
    logger.info(
        "%d of %d cells to process into %s", len(requests), len(cell_catalog.parents), store_path
    )
    if dry_run:
        return {
            "store": store_path,
            "cells": [str(r.parent_morton) for r in requests],
            "dry_run": True,
        }

    provenance = {"catalog": {**cell_catalog.metadata, "fingerprint": cell_catalog.fingerprint}}
    check_store(store_path, pipeline, cell_catalog.parents)
    # The template is made while the granules are read: the extracts do not
    # need it, the cells need both (on S3 a template is ~3 s of round trips).
    template = prepare_store.submit(store_path, pipeline, cell_catalog.parents, provenance)

    # Only extracts read NSIDC's granules; cells read fragments from the output
    # store with the backend's own identity, so they are handed no credentials.
    extracts = plan_extracts(requests, height_change=keep_fragments)
    cells = [replace(r, from_fragments=True) for r in requests]
    with ExitStack() as stack:
        progress = stack.enter_context(run_progress(len(extracts), len(cells)))
        if backend in ("local", "dask"):
            workers, window = stack.enter_context(local_workers(backend, concurrency, dask_address))

            def extract(group: list[ExtractRequest]) -> PrefectFuture:
                return extract_locally.submit(group, source, workers)

            def grid(group: list[CellRequest]) -> PrefectFuture:
                task = grid_locally(_parents_of(group))
                return task.submit(group, store_id, cell_timeout_s, workers)

            extract_batches, cell_batches = in_groups(extracts), in_groups(cells)
        elif backend == "lambda":
            window = lambda_concurrency(concurrency)
            client = lambda_client(aws_credentials_block, cell_timeout_s, window)

            def extract(request: ExtractRequest) -> PrefectFuture:
                return extract_on_lambda.submit(request, source, client, lambda_function)

            def grid(request: CellRequest) -> PrefectFuture:
                task = grid_on_lambda([request.parent_morton])
                return task.submit(request, store_id, client, lambda_function)

            extract_batches, cell_batches = extracts, cells
        elif backend == "ecs":
            window = concurrency or ECS_CONCURRENCY

            def extract(request: ExtractRequest) -> PrefectFuture:
                return extract_on_ecs.submit(
                    request, source, ecs_extract_deployment, credentials_block
                )

            def grid(request: CellRequest) -> PrefectFuture:
                task = grid_on_ecs([request.parent_morton])
                return task.submit(request, store_id, ecs_deployment)

            extract_batches, cell_batches = extracts, cells
        else:
            raise ValueError(f"backend must be local, dask, lambda or ecs, got {backend!r}")

        extracted, lost = run_windowed(
            extract, extract_batches, window, progress.extract_done, _granules_of
        )
        if lost:
            record_failed_extracts([e for e in extracts if e.granule_url in lost], lost)
        # What the cells' closures above use, once the template is made.
        store_id = template.result()
        proven = proven_parents(store_path, pipeline, requests)
        grid_locally = cache_unless_proven(grid_cells_locally, proven)
        grid_on_lambda = cache_unless_proven(grid_cell_on_lambda, proven)
        grid_on_ecs = cache_unless_proven(grid_cell_on_ecs, proven)
        results, failures = run_windowed(
            grid, cell_batches, window, progress.cell_done, _parents_of
        )
    if failures:
        record_failed_cells([r for r in requests if r.parent_morton in failures], failures)
    if staged_orders(pipeline):
        # After every cell, failed ones included: the levels show what the
        # order-12 chunks show, from every parent's staging object.
        assemble_store_levels(store_path, pipeline)
    consolidate_store(store_path)
    summary = report_run(
        results,
        failures,
        extracted,
        wall_s=time.monotonic() - started,
        lambda_memory_mb=lambda_memory_mb,
        lambda_architecture=lambda_architecture,
        store_path=store_path,
        accept_partial=accept_partial,
    )
    if not keep_fragments and not summary["failed_cells"]:
        remove_fragments(store_path, pipeline)
    if summary["failed_cells"]:
        raise CellsFailedError(
            f"{len(summary['failed_cells'])} of {len(requests)} cells incomplete: "
            + ", ".join(summary["failed_cells"][:10])
            + " — retry the flow run to re-run only these cells",
            summary=summary,
        )
    return summary


def _parents_of(cells: CellRequest | list[CellRequest]) -> list[int]:
    """The parent cells of one task run's work: one cell's, or a group's."""
    return [r.parent_morton for r in (cells if isinstance(cells, list) else [cells])]


def _granules_of(extracts: ExtractRequest | list[ExtractRequest]) -> list[str]:
    """The granules of one task run's work: one extract's, or a group's."""
    return [r.granule_url for r in (extracts if isinstance(extracts, list) else [extracts])]
