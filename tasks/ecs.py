"""The ECS backend: each cell as a child flow run of the ``process-cell`` deployment."""

from __future__ import annotations

from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Failed, State

from magg.tasks.cells import CELL_TIMEOUT_S, cell_task, raise_if_incomplete
from magg_core.errors import (
    ERROR_KINDS,
    CellFailedError,
    CredentialsRejectedError,
    error_from_kind,
    error_kind,
)
from magg_core.grid.cell import request_config
from magg_core.schema import CellRequest, CellResult, ExtractRequest
from magg_core.store.arrays import open_store
from magg_core.store.records import read_records

CREDENTIALS_REJECTED = "CredentialsRejected"
"""The name of the ``Failed`` state a child flow run ends in when S3 refused its
credentials (:func:`credentials_rejected`): the parent tells that cause by the
state's name, which Prefect keeps as given, rather than by words in its message."""

FAILED_STATE_NAMES = {kind: f"Failed:{kind}" for kind in ERROR_KINDS}
"""The names of the ``Failed`` state a child flow run ends in when its work raised,
by the failure's branch of :class:`~magg_core.errors.MaggError` (:func:`failed_state`):
the structured field by which the parent raises the same branch again."""

CHILD_RUN_TIMEOUT_S = 3 * CELL_TIMEOUT_S
"""How long to wait for a child run: the cell's own limit plus room for a
Fargate task to be placed, pull the image and start Python. A child still
pending after this fails the cell visibly instead of holding the run forever."""


@cell_task
def grid_cell_on_ecs(request: CellRequest, store_id: str, deployment: str) -> CellResult:
    """Run the cell as a child flow run of the ``process-cell`` deployment.

    The child reads the cell's fragments with the container's own identity,
    so it is handed no credentials. Its outcome is read back from the durable
    record it wrote in the store, so no result storage has to be shared
    between the containers and this process.
    """
    return _run_child(request, deployment)


def credentials_rejected(exc: CredentialsRejectedError) -> State:
    """The final state of a child flow run whose credentials S3 refused (returned by the flow)."""
    return Failed(name=CREDENTIALS_REJECTED, message=f"S3 refused the credentials: {exc}")


def failed_state(exc: Exception) -> State:
    """The final state of a child flow run whose work raised ``exc`` (returned by the flow).

    Refused credentials end in :func:`credentials_rejected`; anything else in a
    state named by its branch (:data:`FAILED_STATE_NAMES`), with the exception's
    type and message as the state's message.
    """
    if isinstance(exc, CredentialsRejectedError):
        return credentials_rejected(exc)
    name = FAILED_STATE_NAMES[error_kind(exc)]
    return Failed(name=name, message=f"{type(exc).__name__}: {exc}")


def raise_if_child_failed(state: State | None, what: str) -> None:
    """Raise what a child run's failed state carries: :class:`CredentialsRejectedError`
    if S3 refused its credentials (the caller's :func:`~tasks.cells.replacing_rejected`
    then has fresh credentials fetched for the retry), else an error of the branch
    its name gives (:func:`failed_state`). A state of neither kind raises nothing."""
    if state is None:
        return
    if state.name == CREDENTIALS_REJECTED:
        raise CredentialsRejectedError(f"{what}: {state.message}")
    for kind, name in FAILED_STATE_NAMES.items():
        if state.name == name:
            raise error_from_kind(kind, f"{what}: {state.message}")


def run_child(
    deployment: str,
    request: CellRequest | ExtractRequest,
    credentials_block: str | None,
    name: str,
) -> FlowRun:
    """Start a child flow run with the request (no secret in it) and wait until it ends.

    Its parameters name the Secret block holding the credentials -- and not
    even that (``credentials_block=None``) when the run uses none (local
    files, public buckets, or the container's own role), so a child never
    picks up a stale block left by another run.
    """
    return run_deployment(
        deployment,
        parameters={
            "request": request.to_event(include_credentials=False),
            "credentials_block": credentials_block,
        },
        flow_run_name=name,
        timeout=CHILD_RUN_TIMEOUT_S,
        poll_interval=2,
    )


def _run_child(request: CellRequest, deployment: str) -> CellResult:
    name = f"cell-{request.parent_morton}"
    flow_run = run_child(deployment, request, None, name)
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
    raise_if_child_failed(state, f"cell {request.parent_morton}")
    raise CellFailedError(
        f"cell {request.parent_morton}: child flow run {flow_run.name} ended {state.name}"
        f" without a record: {state.message or 'no message'}"
    )
