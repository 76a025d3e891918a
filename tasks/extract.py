"""The per-granule extract task (stage one of a run): a granule read once into fragments.

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
from magg.tasks.ecs import raise_if_child_failed, run_child
from magg.tasks.workers import worker_slot
from magg_core.access.credentials import Credentials
from magg_core.extract.granule import extract_granule, record_extract_failure, stored_extract
from magg_core.schema import ExtractRequest, ExtractResult


def extract_task(fn):
    """The per-granule task policy: the cells' retries, no Prefect cache (see above)."""
    return work_task(fn, cache_policy=NONE, task_run_name="extract-{request.name}")


@extract_task
def extract_locally(
    request: ExtractRequest, credentials: Credentials | None, workers: Executor
) -> ExtractResult:
    """Extract the granule in one of this machine's worker processes."""
    with worker_slot(workers):
        request = replace(request, s3_credentials=fresh(credentials))
        with replacing_rejected(credentials, request.s3_credentials):
            return workers.submit(extract_granule, request).result()


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
