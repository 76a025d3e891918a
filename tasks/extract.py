"""The extract tasks (stage one of a run): each granule read once into fragments.

On the local and dask backends a task run extracts a group of granules
(:func:`~magg.tasks.dispatch.in_groups`); on Lambda and ECS, one.

Retried like a cell on transient failures, with fresh credentials after S3
refused them. Not cached by Prefect: the store itself says which granules
are extracted (their extract records), so a retried or later run re-reads
only granules whose fragments are missing or stale -- including after a run
removed its fragments, which a Prefect cache entry would not know about. A
granule the store already holds costs one GET here, not an invocation or a
child run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency

from deployments.aws.lambda_client import invoke_extract
from magg.tasks.cells import LAMBDA_CONCURRENCY_LIMIT, fresh, replacing_rejected, work_task
from magg.tasks.credentials import publish_credentials
from magg.tasks.dispatch import group_outcome
from magg.tasks.ecs import raise_if_child_failed, run_child
from magg.tasks.workers import take_slot
from magg_core.access.credentials import Credentials
from magg_core.extract.granule import extract_granule, record_extract_failure, stored_extract
from magg_core.schema import ExtractRequest, ExtractResult


def extract_task(fn):
    """The per-granule task policy: the cells' retries, no Prefect cache (see above)."""
    return work_task(fn, cache_policy=NONE, task_run_name="extract-{request.name}")


def _group_run_name(parameters: dict[str, Any]) -> str:
    """``extract-{name}`` for a group of one granule (as on every backend),
    ``extracts-{first}+{others}`` for more."""
    requests = parameters["requests"]
    first = requests[0].name
    return f"extract-{first}" if len(requests) == 1 else f"extracts-{first}+{len(requests) - 1}"


def _extract_locally(
    requests: list[ExtractRequest], credentials: Credentials | None, workers: Executor
) -> list[ExtractResult]:
    """Extract a group of granules in worker processes: this machine's, or a Dask cluster's.

    Each granule waits for a free process (:func:`~magg.tasks.workers.take_slot`)
    and only then gets its credentials, so none waits in a queue with them. A
    granule S3 refused credentials for has them replaced for the retry. A
    retry of the group re-reads only the granules whose extract did not
    complete: :func:`~magg_core.extract.granule.extract_granule` finds the
    others' extract records in the store.

    Raises
    ------
    GroupInterruptedError, GroupFailedError
        As :func:`~magg.tasks.dispatch.group_outcome`, when a granule's extract raised.
    """
    submitted = []
    for request in requests:
        release = take_slot(workers)
        try:
            used = fresh(credentials)
            future = workers.submit(extract_granule, replace(request, s3_credentials=used))
        except BaseException:
            release(None)
            raise
        future.add_done_callback(release)
        submitted.append((request, used, future))
    results, errors = [], {}
    for request, used, future in submitted:
        try:
            with replacing_rejected(credentials, used):
                results.append(future.result())
        except Exception as exc:  # reported per granule
            errors[request.granule_url] = exc
    return group_outcome(results, errors, [], len(requests))


extract_locally = work_task(
    _extract_locally, name="extract-locally", cache_policy=NONE, task_run_name=_group_run_name
)


@extract_task
def extract_on_lambda(
    request: ExtractRequest, credentials: Credentials | None, lambda_client: Any, function_name: str
) -> ExtractResult:
    """Invoke the deployed function with an extract event, once per attempt."""
    if (done := _already_extracted(request)) is not None:
        return done
    with concurrency(
        LAMBDA_CONCURRENCY_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False
    ):
        request = replace(request, s3_credentials=fresh(credentials))
        with replacing_rejected(credentials, request.s3_credentials):
            return invoke_extract(lambda_client, function_name, request)


@extract_task
def extract_on_ecs(
    request: ExtractRequest,
    credentials: Credentials | None,
    deployment: str,
    credentials_block: str,
) -> ExtractResult:
    """Run the extract as a child flow run of the ``extract-granule`` deployment."""
    if (done := _already_extracted(request)) is not None:
        return done
    used = publish_credentials(credentials, credentials_block)
    with replacing_rejected(credentials, used):
        name = f"extract-{request.name}"
        block = credentials_block if credentials is not None else None
        flow_run = run_child(deployment, request, block, name)
        state = flow_run.state
        stored = stored_extract(request)  # the child's outcome, read where it wrote it
        if state is not None and state.is_completed() and stored is not None:
            return stored
        message = state.message if state is not None else "no state"
        raise_if_child_failed(state, f"granule {request.name}")
        raise RuntimeError(f"granule {request.name}: child flow run {flow_run.name}: {message}")


def _already_extracted(request: ExtractRequest) -> ExtractResult | None:
    """The store's record of this extract, if it succeeded: no invocation, no child run."""
    stored = stored_extract(request)
    return stored.as_found() if stored is not None and stored.status == "ok" else None


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record_failed_extracts(requests: Sequence[ExtractRequest], failures: Mapping[str, str]) -> None:
    """Record why each granule whose extract task raised has no fragments.

    Its cells then say so in their ``files_failed``, instead of "not extracted".
    """
    for request in requests:
        record_extract_failure(request, failures[request.granule_url])
