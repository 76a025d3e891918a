"""The ECS backend: each cell as a child flow run of the ``process-cell`` deployment."""

from __future__ import annotations

from prefect.deployments import run_deployment

from magg_core.cell import request_config
from magg_core.credentials import Credentials
from magg_core.errors import CellFailedError
from magg_core.request import CellRequest, CellResult
from magg_core.store import open_store, read_records
from tasks.cells import cell_task, raise_if_failed
from tasks.credentials import publish_credentials


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
    refreshes first; its parameters carry no secret. Its outcome is read back
    from the durable record it wrote in the store, so no result storage has to
    be shared between the containers and this process.
    """
    publish_credentials(credentials, credentials_block)
    flow_run = run_deployment(
        deployment,
        parameters={
            "request": request.to_event(include_credentials=False),
            "credentials_block": credentials_block,
        },
        flow_run_name=f"cell-{request.parent_morton}",
        timeout=None,
        poll_interval=2,
    )
    if not flow_run.state or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise CellFailedError(
            f"cell {request.parent_morton}: child flow run {flow_run.name} ended {state}"
        )
    config = request_config(request)
    store = open_store(request.store_path)
    return raise_if_failed(read_records(store, config)[request.parent_morton].result)
