"""Flow ``process-cell``: one parent cell as its own flow run (the ECS backend).

The parent ``process-cycle`` run starts one of these per cell through the
``process-cell`` deployment on an ECS work pool. Parameters carry the cell
request without credentials; the credentials come from the Secret block the
parent keeps fresh. Anyone who may create a flow run writes those parameters,
so the request is checked like a Lambda event (:func:`magg_core.schema.check_request`
with :data:`magg_core.schema.ECS`): its granules must be S3 objects, never local
files, and its store an ``s3://`` URL (below ``MAGG_ALLOWED_STORES`` when set).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import State

from magg.tasks.cells import CELL_TIMEOUT_S, raise_if_incomplete
from magg.tasks.credentials import load_published_credentials
from magg.tasks.ecs import failed_state
from magg_core.grid.cell import process_cell
from magg_core.schema import ECS, CellRequest


@flow(name="process-cell")
def process_cell_flow(
    request: dict[str, Any], credentials_block: str | None = None, timeout_s: int = CELL_TIMEOUT_S
) -> dict[str, Any] | State:
    """Grid one cell; fails (so the parent sees it) when the cell is failed or partial.

    ``timeout_s`` is a deadline the cell checks before writing: a child the
    parent stopped waiting for (and may have relaunched on a retry) must not
    write after its successor. A failure to run the cell ends the run in a
    ``Failed`` state named by its branch (:func:`tasks.ecs.failed_state`):
    :data:`tasks.ecs.CREDENTIALS_REJECTED` when S3 refused the credentials.
    """
    started = time.monotonic()
    cell = CellRequest.from_event(request, ECS)
    if credentials_block:
        cell = replace(cell, s3_credentials=load_published_credentials(credentials_block))
    try:
        result = process_cell(cell, deadline=started + timeout_s)
    except Exception as exc:  # noqa: BLE001 - the parent reads the failure's branch
        get_run_logger().exception("failed: %s", type(exc).__name__)
        return failed_state(exc)  # refused credentials: the parent retries with fresh ones
    get_run_logger().info(
        "cell %s: %s, %d obs, %d/%d granules read",
        result.parent_morton,
        result.status,
        result.total_obs,
        result.files_processed,
        result.granule_count,
    )
    return raise_if_incomplete(result).to_dict()
