"""The per-cell tasks: one parent cell in a worker process (this machine's or a Dask
cluster's), on AWS Lambda, or on an ECS flow run.

All share one policy (retries with backoff + jitter on transient errors
only, a persisted result, and a cache key over everything that determines
the cell's output) so that retrying a failed flow run — the Prefect UI's
Retry button — re-executes only the cells that failed or are partial.
Cells read fragments from the output store with the backend's own identity,
so they are handed no NSIDC credentials; the extract tasks
(:mod:`tasks.extract`), which read granules, fetch theirs at dispatch from an
in-process source, and they never become a task parameter value the API
stores, a cache key, a result or a log line.

Results and cache records go to Prefect's default result storage: local
files unless ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` names a block (e.g.
an ``s3-bucket`` block), which remote runs need so that a retry — possibly
on another machine — finds the cells that already succeeded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence, Set
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any

import httpx
from prefect import Task, task
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff
from zarr.abc.store import Store

import magg_core
from deployments.aws.lambda_client import invoke_cell, is_retryable
from magg.tasks.caching import parent_cache_key
from magg.tasks.dispatch import group_outcome
from magg.tasks.workers import CELLS_PER_PROCESS, process_cells_within
from magg_core.access.credentials import Credentials
from magg_core.access.s3 import S3Credentials
from magg_core.config import PipelineConfig, load_config
from magg_core.errors import CellFailedError, CredentialsRejectedError, is_transient
from magg_core.grid.cell import request_config
from magg_core.schema import CellRequest, CellResult
from magg_core.store.arrays import open_store
from magg_core.store.records import CellRecord, input_fingerprint, proven_cells, read_records

LAMBDA_CONCURRENCY_LIMIT = "magg-lambda"
"""Global concurrency limit shared by every run invoking the function."""
CELL_RETRIES = 3
CELL_RETRY_BACKOFF_S = 10
"""First retry after ~10 s, then 20 s, 40 s (± half, so throttled cells spread out)."""
CELL_TIMEOUT_S = 720
"""Default per-cell limit, matching the Lambda function's timeout: a cell that needs
longer should be split (a finer parent order), not waited for."""


def cell_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A cell's :func:`~magg.tasks.caching.parent_cache_key`: its granule set, config hash
    and magg version (the input fingerprint), its orders, the store and its identity."""
    request: CellRequest = parameters["request"]
    config_hash = load_config(request.config).hash
    return parent_cache_key(
        "cell",
        request.parent_morton,
        input_fingerprint(request.granule_urls, config_hash, magg_core.__version__),
        request.store_path,
        parameters["store_id"],
        orders=[request.parent_order, request.child_order],
    )


def group_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A group's key: the digest of its cells' :func:`cell_cache_key` values, in order.

    Equal exactly when every cell's key is; one cell's new granule or a
    re-created store gives the group a new key.
    """
    keys = [
        cell_cache_key(context, {**parameters, "request": request})
        for request in parameters["requests"]
    ]
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    return f"magg-cells-{parameters['requests'][0].parent_morton}-{digest[:24]}"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only failures that may succeed next time.

    Besides the cell's own transient failures, a Prefect API that is busy
    (5xx, 429, a dropped connection) while an ECS child run is started or
    polled says nothing about the cell.
    """
    try:
        state.result()
    except Exception as exc:  # the failure we are classifying
        return is_transient(exc) or is_retryable(exc) or _api_busy(exc)
    return False


def _api_busy(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, httpx.TransportError)


def fresh(credentials: Credentials | None) -> S3Credentials | None:
    """Credentials with at least the refresh margin left, fetched at dispatch time."""
    return credentials.refresh_if_needed() if credentials is not None else None


def work_task(fn, **options: Any):
    """A task with the retry policy of all per-cell and per-granule work, plus ``options``."""
    return task(
        fn,
        retries=CELL_RETRIES,
        retry_delay_seconds=exponential_backoff(backoff_factor=CELL_RETRY_BACKOFF_S),
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_transient,
        **options,
    )


def cell_task(fn):
    """The shared per-cell task policy (see the module docstring)."""
    return work_task(
        fn,
        persist_result=True,
        cache_key_fn=cell_cache_key,
        task_run_name="cell-{request.parent_morton}",
    )


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def proven_parents(
    store_path: str, config: PipelineConfig, requests: Sequence[CellRequest]
) -> set[int]:
    """The cells of ``requests`` whose record proves their output is in the store.

    A cell's Prefect cache entry says only that it once succeeded; the store
    says whether what it wrote is still there (:func:`magg_core.store.records.proven_cells`).
    The flow submits every other cell with ``refresh_cache=True``
    (:func:`cache_unless_proven`), so a cell whose chunk or staging object was
    lost since is done again, and a proven cell is taken from the cache.
    """
    return set(proven_records(open_store(store_path), config, requests))


def proven_records(
    store: Store,
    config: PipelineConfig,
    requests: Sequence[CellRequest],
    records: dict[int, CellRecord] | None = None,
) -> dict[int, CellRecord]:
    """The records proving the output of cells of ``requests``, by parent morton word.

    ``records``: the records to judge (default: every record in the store).
    """
    fingerprints = {
        r.parent_morton: input_fingerprint(r.granule_urls, config.hash, magg_core.__version__)
        for r in requests
    }
    return proven_cells(store, config, fingerprints, records)


def cache_unless_proven(cell: Task, proven: Set[int]) -> Callable[[Iterable[int]], Task]:
    """The task to submit for the work of some parent cells: ``cell`` as is when every one
    of them is proven, else ``cell`` with ``refresh_cache=True``."""
    refreshing = cell.with_options(refresh_cache=True)
    return lambda parents: cell if set(parents) <= proven else refreshing


def raise_if_incomplete(result: CellResult) -> CellResult:
    """A failed or partial cell fails its task, carrying its result.

    A failed task persists no result, so no later run takes an incomplete cell
    from the cache: re-running after the inputs are repaired recomputes exactly
    these cells. The flow reads the result off the exception to report the cell
    (and, for partial cells a run accepts, to count them as done).
    """
    if not result.is_complete:
        reasons = "; ".join(f"{f.url}: {f.reason}" for f in result.files_failed[:5])
        raise CellFailedError(
            f"cell {result.parent_morton} {result.status}: {result.error} ({reasons})", result
        )
    return result


@contextmanager
def replacing_rejected(credentials: Credentials | None, used: S3Credentials | None):
    """Tell ``credentials`` when S3 refused ``used``, so the retry fetches new ones."""
    try:
        yield
    except Exception as exc:
        if (
            credentials is not None
            and used is not None
            and isinstance(exc, CredentialsRejectedError)
        ):
            credentials.reject(used)
        raise


def group_run_name(parameters: dict[str, Any]) -> str:
    """``cell-{parent}`` for a group of one cell (as every backend names a cell's task
    run), ``cells-{first}+{others}`` for more."""
    requests = parameters["requests"]
    first = requests[0].parent_morton
    return f"cell-{first}" if len(requests) == 1 else f"cells-{first}+{len(requests) - 1}"


def _grid_cells_locally(
    requests: list[CellRequest], store_id: str, timeout_s: int, workers: Executor
) -> list[CellResult]:
    """Grid a group of cells in worker processes: this machine's, or a Dask cluster's
    (:mod:`tasks.workers`); every cell's result, or raise with each cell's outcome.

    The cells go to the workers at once, a few to a process
    (:func:`~magg.tasks.workers.process_cells_within`), so the pool balances
    cells, not groups. A cell whose record proves its output (:func:`proven_records`) is
    not done again: its result is its record's. That is what makes a retry of
    the group -- Prefect's after a transient failure, or the UI's Retry of
    the flow run -- redo only the cells that did not complete.

    The task waits for the workers, so the timeout is a deadline each cell
    checks before aggregating and before writing, from when a worker takes
    it: an attempt that overran raises
    :class:`~magg_core.errors.CellTimeoutError` without writing, and only
    then may a retry start, so no stale attempt writes after a newer one.

    Raises
    ------
    GroupInterruptedError, GroupFailedError
        As :func:`~magg.tasks.dispatch.group_outcome`: a cell failed or is
        partial, or raised.
    """
    config = request_config(requests[0])
    store = open_store(requests[0].store_path)
    recorded = read_records(store, config, [r.parent_morton for r in requests])
    done = proven_records(store, config, requests, recorded)
    todo = [r for r in requests if r.parent_morton not in done]
    batches = [todo[i : i + CELLS_PER_PROCESS] for i in range(0, len(todo), CELLS_PER_PROCESS)]
    futures = [(batch, workers.submit(process_cells_within, batch, timeout_s)) for batch in batches]
    results = [record.result for record in done.values()]
    errors: dict[int, BaseException] = {}
    for batch, future in futures:
        try:
            outcomes = future.result()
        except Exception as exc:  # the worker itself failed: every cell of its batch
            outcomes = [exc] * len(batch)
        for request, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                errors[request.parent_morton] = outcome  # reported per cell, below
            else:
                results.append(outcome)
    incomplete = [f"cell {r.parent_morton} {r.status}" for r in results if not r.is_complete]
    return group_outcome(results, errors, incomplete, len(requests))


grid_cells_locally = work_task(
    _grid_cells_locally,
    name="grid-cells-locally",
    persist_result=True,
    cache_key_fn=group_cache_key,
    task_run_name=group_run_name,
)


@cell_task
def grid_cell_on_lambda(
    request: CellRequest,
    store_id: str,
    lambda_client: Any,
    function_name: str,
) -> CellResult:
    """Invoke the deployed Lambda function once per attempt (no hidden botocore retries).

    The client's read timeout outwaits the function, so when an attempt ends
    the invocation has ended too, and a retry never overlaps a running one.
    The concurrency slot is a throttle, not a lock: losing its lease renewal
    must not abandon an invocation that is still running.
    """
    with concurrency(
        LAMBDA_CONCURRENCY_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False
    ):
        return raise_if_incomplete(invoke_cell(lambda_client, function_name, request))
