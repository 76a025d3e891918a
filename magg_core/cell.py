"""One parent cell, end to end: read → aggregate → write → record.

This is the unit of work every backend runs (a thread, the Lambda handler, an
ECS flow run). It never raises for problems in the data: a bad granule is a
line in ``files_failed`` and a cell whose every granule failed is ``failed``.
It does raise for problems in the request or the store (a template that does
not match), because those are the caller's to fix and retrying won't help.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

import magg_core
from magg_core.aggregate import aggregate
from magg_core.config import PipelineConfig, load_config
from magg_core.errors import CellTimeoutError
from magg_core.read import GranulePoints, read_granules
from magg_core.request import CellRequest, CellResult, Timings
from magg_core.s3 import S3Endpoint
from magg_core.store import (
    CellRecord,
    check_template,
    chunk_index,
    input_fingerprint,
    open_store,
    write_cell,
    write_record,
)


def request_config(request: CellRequest) -> PipelineConfig:
    """The request's config (built-in ``atl06`` by default) at the request's orders."""
    config = load_config(request.config)
    if (config.output.parent_order, config.output.child_order) != (
        request.parent_order,
        request.child_order,
    ):
        config = config.with_orders(request.parent_order, request.child_order)
    return config


def process_cell(
    request: CellRequest,
    *,
    endpoint: S3Endpoint | None = None,
    max_workers: int = 8,
    deadline: float | None = None,
) -> CellResult:
    """Grid one parent cell into its chunk of the store and record the outcome.

    Parameters
    ----------
    request
        The cell to process; ``s3_credentials`` are used for ``s3://`` granules.
    endpoint
        Where ``s3://`` granules and stores live (default: from the
        environment, i.e. AWS itself unless ``AWS_ENDPOINT_URL_S3`` is set).
    max_workers
        Granules read at once. Reading dominates; a few concurrent granules
        hide S3 latency while keeping memory bounded.
    deadline
        A ``time.monotonic()`` instant after which the cell gives up *before*
        writing (raising :class:`CellTimeoutError`). A thread cannot be killed,
        so an attempt that overran its timeout must not write late, after a
        retry already has: this fence makes every chunk written at most once
        per successful attempt.
    """
    started = time.perf_counter()
    endpoint = endpoint or S3Endpoint.from_env()
    config = request_config(request)
    store = open_store(request.store_path, endpoint=endpoint)
    chunk_idx = request.chunk_idx
    if chunk_idx is None:
        chunk_idx = chunk_index(store, config, request.parent_morton)
    check_template(store, config, request.parent_morton, chunk_idx)

    timings = Timings()
    result = CellResult(
        parent_morton=request.parent_morton,
        status="no_granules",
        granule_count=len(request.granule_urls),
    )
    points: list[GranulePoints] = []
    if request.granule_urls:
        t0 = time.perf_counter()
        points, failures = read_granules(
            request.granule_urls,
            request.parent_morton,
            config,
            credentials=request.s3_credentials,
            endpoint=endpoint,
            max_workers=max_workers,
        )
        timings.read = time.perf_counter() - t0
        result.files_processed = len(points)
        result.files_failed = failures

    _check_deadline(deadline, request)
    t0 = time.perf_counter()
    child_index, columns = _concatenate(points, config)
    stats = aggregate(child_index, columns, config)
    timings.aggregate = time.perf_counter() - t0

    result.total_obs = int(child_index.size)
    result.cells_with_data = int(
        np.count_nonzero(np.bincount(child_index, minlength=config.output.children_per_parent))
    )
    if request.granule_urls:
        if result.files_processed == 0:
            result.status = "failed"
            result.error = f"all {len(request.granule_urls)} granules failed to read"
        else:
            result.status = "ok" if result.total_obs else "empty"

    # A failed cell keeps whatever an earlier successful run wrote; every other
    # outcome (including no data) owns its chunk and overwrites it, so a re-run
    # after the inputs changed never leaves stale statistics behind.
    if result.status != "failed":
        _check_deadline(deadline, request)
        t0 = time.perf_counter()
        write_cell(store, config, chunk_idx, stats)
        timings.write = time.perf_counter() - t0

    timings.total = time.perf_counter() - started
    result.duration_s = timings
    result.peak_rss_mb = peak_rss_mb()
    write_record(
        store,
        config,
        CellRecord(
            result=result,
            fingerprint=input_fingerprint(request.granule_urls, config.hash, magg_core.__version__),
            written_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ),
    )
    return result


def _check_deadline(deadline: float | None, request: CellRequest) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise CellTimeoutError(
            f"cell {request.parent_morton} passed its deadline; nothing was written"
        )


def _concatenate(
    points: list[GranulePoints], config: PipelineConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    variables = config.data_source.variables
    if not points:
        return np.empty(0, dtype=np.int64), {v: np.empty(0, dtype=np.float32) for v in variables}
    child_index = np.concatenate([p.child_index for p in points])
    columns = {v: np.concatenate([p.columns[v] for p in points]) for v in variables}
    return child_index, columns


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (what Lambda bills against).

    In the thread backend this is the whole process's peak, shared by all cells.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return round(peak * bytes_per_unit / 2**20, 1)
