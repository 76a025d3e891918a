"""The ECS backend: each cell as a child flow run of the ``process-cell`` deployment."""

from __future__ import annotations

from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from magg.tasks.cells import CELL_TIMEOUT_S, cell_task, raise_if_incomplete, replacing_rejected
from magg.tasks.credentials import publish_credentials
from magg_core.cell import request_config
from magg_core.credentials import Credentials
from magg_core.errors import CellFailedError, CredentialsRejectedError
from magg_core.extract import ExtractRequest
from magg_core.request import CellRequest, CellResult
from magg_core.store import open_store, read_records

CHILD_RUN_TIMEOUT_S = 3 * CELL_TIMEOUT_S
"""How long to wait for a child run: the cell's own limit plus room for a
Fargate task to be placed, pull the image and start Python. A child still
pending after this fails the cell visibly instead of holding the run forever."""


@cell_task
def grid_cell_on_ecs(
    request: CellRequest,
    store_id: str,
    credentials: Credentials | None,
    deployment: str,
    credentials_block: str,
) -> CellResult:
    """Run the cell as a child flow run of the ``process-cell`` deployment.

    The child reads credentials from a Prefect Secret block that this task
    refreshes first (see :func:`run_child`). Its outcome is read back from the durable
    record it wrote in the store, so no result storage has to be shared
    between the containers and this process.
    """
    used = publish_credentials(credentials, credentials_block)
    with replacing_rejected(credentials, used):
        return _run_child(request, credentials, deployment, credentials_block)


def run_child(
    deployment: str,
    request: CellRequest | ExtractRequest,
    credentials: Credentials | None,
    credentials_block: str,
    name: str,
) -> FlowRun:
    """Start a child flow run with the request (no secret in it) and wait until it ends.

    Its parameters name the Secret block holding the credentials -- and not
    even that when the run uses none (local files, public buckets, or the
    container's own role), so a child never picks up a stale block left by
    another run.
    """
    return run_deployment(
        deployment,
        parameters={
            "request": request.to_event(include_credentials=False),
            "credentials_block": credentials_block if credentials is not None else None,
        },
        flow_run_name=name,
        timeout=CHILD_RUN_TIMEOUT_S,
        poll_interval=2,
    )


def _run_child(
    request: CellRequest, credentials: Credentials | None, deployment: str, credentials_block: str
) -> CellResult:
    name = f"cell-{request.parent_morton}"
    flow_run = run_child(deployment, request, credentials, credentials_block, name)
    state = flow_run.state
    if state is None or not state.is_final():
        raise CellFailedError(
            f"cell {request.parent_morton}: child flow run {flow_run.name} is still "
            f"{state.name if state else 'unknown'} after {CHILD_RUN_TIMEOUT_S} s"
        )
    record = read_records(open_store(request.store_path), request_config(request)).get(
        request.parent_morton
    )
    if record is not None and record.written_at >= f"{flow_run.created:%Y-%m-%dT%H:%M:%SZ}":
        return raise_if_incomplete(record.result)  # this child's own outcome
    if CredentialsRejectedError.__name__ in (state.message or ""):
        raise CredentialsRejectedError(f"cell {request.parent_morton}: {state.message}")
    raise CellFailedError(
        f"cell {request.parent_morton}: child flow run {flow_run.name} ended {state.name}"
        f" without a record: {state.message or 'no message'}"
    )
