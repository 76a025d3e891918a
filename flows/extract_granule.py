"""Flow ``extract-granule``: one granule into fragments as its own flow run (the ECS backend).

The parent ``process-cycle`` run starts one of these per granule through the
``extract-granule`` deployment on the ECS work pool, before the cells. Like
``process-cell``, its parameters carry the request without credentials,
which come from the Secret block the parent keeps fresh, and its request is
checked like a Lambda event (:func:`magg_core.schema.check_request`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import State

from magg.tasks.credentials import load_published_credentials
from magg.tasks.ecs import failed_state
from magg_core.extract.granule import extract_granule
from magg_core.schema import ECS, ExtractRequest


@flow(name="extract-granule")
def extract_granule_flow(
    request: dict[str, Any], credentials_block: str | None = None
) -> dict | State:
    """Extract one granule; a granule that cannot be read is recorded, not raised.

    Its outcome is in the store (the extract record), where the parent reads it.
    A failure to run the extract ends the run in a ``Failed`` state named by
    its branch (:func:`tasks.ecs.failed_state`): the parent retries a transient
    one, and with fresh credentials one named
    :data:`tasks.ecs.CREDENTIALS_REJECTED`.
    """
    extract = ExtractRequest.from_event(request, ECS)
    if credentials_block:
        extract = replace(extract, s3_credentials=load_published_credentials(credentials_block))
    try:
        result = extract_granule(extract)
    except Exception as exc:  # noqa: BLE001 - the parent reads the failure's branch
        get_run_logger().exception("failed: %s", type(exc).__name__)
        return failed_state(exc)  # refused credentials: the parent retries with fresh ones
    get_run_logger().info(
        "granule %s: %s, %d points in %d cells%s",
        extract.name,
        result.status,
        result.points,
        result.parents,
        f" ({result.reason})" if result.reason else "",
    )
    return result.to_dict()
