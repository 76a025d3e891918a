"""One parent cell, end to end: read → aggregate → write → record.

This is the unit of work every backend runs (a thread, the Lambda handler, an
ECS flow run). A bad granule is a line in ``files_failed``: a cell with some
granules failed is ``partial``, one whose every granule failed is ``failed``.
Neither writes statistics (a partial chunk would look complete to anyone
reading the arrays) unless the request accepts partial cells; both leave a
record naming each failed granule and why.

With pyramid levels configured, the points are aggregated once more per
coarse order and staged for the flow's assembly (:mod:`magg_core.store.staging`).

Every point of its granules inside the cell is either in the statistics or
counted in the result's ``dropped``, by the filter that left it out (quality
flag, no value, invalid σ). It raises for problems in the request or the
store (a template that does not match), for a derived column that is
invalid where the data passed (a config error naming the expression), for
statistics its dtypes cannot hold, and for failures that may pass
(throttling, refused credentials): the caller retries or reports.
"""

from __future__ import annotations

import numpy as np
from zarr.abc.store import Store

import magg_core
from magg_core.access.s3 import S3Endpoint
from magg_core.config import PipelineConfig, load_config_at
from magg_core.errors import CellDataError
from magg_core.granules.read import read_granules
from magg_core.schema import READ_DROPS, CellRequest, CellResult, GranulePoints
from magg_core.stats.aggregate import (
    SIGMA_DROP,
    InvalidDerivedValueError,
    NonFiniteStatisticError,
    check_derived,
    valid_points,
)
from magg_core.stats.levels import level_statistics
from magg_core.store.arrays import check_template, chunk_index, open_store, write_cell
from magg_core.store.fragments import read_cell_fragments
from magg_core.store.records import input_fingerprint
from magg_core.store.staging import staging_object
from magg_core.store.work import UnitOfWork, record_result


def request_config(request: CellRequest) -> PipelineConfig:
    """The request's config (built-in ``atl06`` by default) at the request's orders."""
    return load_config_at(request.config, request.parent_order, request.child_order)


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
    work = UnitOfWork(request.parent_morton, deadline)
    endpoint = endpoint or S3Endpoint.from_env()
    config = request_config(request)
    store = open_store(request.store_path, endpoint=endpoint)
    chunk_idx = request.chunk_idx
    if chunk_idx is None:
        chunk_idx = chunk_index(store, config, request.parent_morton)
    template = check_template(store, config, request.parent_morton, chunk_idx)

    result = CellResult(
        parent_morton=request.parent_morton,
        status="no_granules",
        granule_count=len(request.granule_urls),
    )
    points: list[GranulePoints] = []
    if request.granule_urls:
        with work.timed("read"):
            if request.from_fragments:
                points, failures = read_cell_fragments(
                    store, config, request.granule_urls, request.parent_morton
                )
            else:
                points, failures = read_granules(
                    request.granule_urls,
                    request.parent_morton,
                    config,
                    credentials=request.s3_credentials,
                    endpoint=endpoint,
                    max_workers=max_workers,
                )
        result.files_processed = len(points)
        result.files_failed = failures

    work.check_deadline()
    with work.timed("aggregate"):
        child_index, columns = _concatenate(points, config)
        read_drops = {r: sum(p.dropped.get(r, 0) for p in points) for r in READ_DROPS}
        points.clear()  # the concatenated arrays hold the points now: not twice while aggregating
        good = valid_points(columns, config)
        result.dropped = {**read_drops, SIGMA_DROP: int(good.size - np.count_nonzero(good))}
        child_index, columns = child_index[good], {k: v[good] for k, v in columns.items()}
        counts = np.bincount(child_index, minlength=config.output.children_per_parent)
        try:
            check_derived(columns, config)
            levels = level_statistics(child_index, columns, config)  # every order, one sort
        except (InvalidDerivedValueError, NonFiniteStatisticError) as exc:
            raise CellDataError(f"cell {request.parent_morton}: {exc}") from exc
        stats = levels.pop(config.output.child_order)

    result.total_obs = int(child_index.size)
    result.cells_with_data = int(np.count_nonzero(counts))
    if request.granule_urls:
        result.status, result.error = _outcome(result, request.accept_partial)

    # An incomplete cell keeps whatever an earlier complete run wrote (unless
    # partial cells are accepted); every other outcome, no data included, owns
    # its chunk and overwrites it, so a re-run after the inputs changed never
    # leaves stale statistics behind. The coarse levels' staging object follows
    # the chunk: written with it, removed when the cell has no data.
    # The record lists what was written, with digests of the bytes put,
    # so that it proves the output only while that output is there
    # (records.proven_cells): a lost chunk or staging object is done again.
    outputs: dict[str, str | None] = {}
    if result.is_complete or (result.status == "partial" and request.accept_partial):
        work.check_deadline()
        with work.timed("write"):
            staged = levels if result.total_obs else None
            objects = staging_object(config, request.parent_morton, staged) if levels else {}
            outputs = write_cell(
                store, config, chunk_idx, stats, objects=objects, template=template
            )
    _record(store, config, request, work.finish(result), outputs)
    return result


def record_failure(
    request: CellRequest, reason: str, *, endpoint: S3Endpoint | None = None
) -> None:
    """Record a cell whose processing raised (write refused, retries exhausted, deadline).

    The orchestrator calls this once the cell's last attempt is over, so that
    ``magg inspect`` shows the cell as ``failed`` with ``reason`` rather than
    not yet run; the chunk keeps whatever an earlier run wrote.
    """
    config = request_config(request)
    store = open_store(request.store_path, endpoint=endpoint or S3Endpoint.from_env())
    result = CellResult(
        parent_morton=request.parent_morton,
        status="failed",
        granule_count=len(request.granule_urls),
        error=reason,
    )
    _record(store, config, request, result)


def _record(
    store: Store,
    config: PipelineConfig,
    request: CellRequest,
    result: CellResult,
    outputs: dict[str, str | None] | None = None,
) -> None:
    fingerprint = input_fingerprint(request.granule_urls, config.hash, magg_core.__version__)
    record_result(store, config, result, fingerprint, outputs)


def _outcome(result: CellResult, accept_partial: bool) -> tuple[str, str | None]:
    """The status and error of a cell that had granules to read."""
    failed, total = len(result.files_failed), result.granule_count
    if result.files_processed == 0:
        return "failed", f"all {total} granules failed to read"
    if failed:
        kept = "written from the others (partial accepted)" if accept_partial else "not written"
        return "partial", f"{failed} of {total} granules failed to read; statistics {kept}"
    return ("ok" if result.total_obs else "empty"), None


def _concatenate(
    points: list[GranulePoints], config: PipelineConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    variables = config.data_source.variables
    if not points:
        return np.empty(0, dtype=np.int64), {v: np.empty(0, dtype=np.float32) for v in variables}
    child_index = np.concatenate([p.child_index for p in points])
    columns = {v: np.concatenate([p.columns[v] for p in points]) for v in variables}
    return child_index, columns
