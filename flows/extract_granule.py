"""Flow ``extract-granule``: one granule into fragments as its own flow run (the ECS backend).

The parent ``process-cycle`` run starts one of these per granule through the
``extract-granule`` deployment on the ECS work pool, before the cells. Like
``process-cell``, its parameters carry the request without credentials,
which come from the Secret block the parent keeps fresh.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger

from magg.tasks.credentials import load_published_credentials
from magg_core.extract import ExtractRequest, extract_granule


@flow(name="extract-granule")
def extract_granule_flow(request: dict[str, Any], credentials_block: str | None = None) -> dict:
    """Extract one granule; a granule that cannot be read is recorded, not raised.

    Its outcome is in the store (the extract record), where the parent reads it.
    """
    extract = ExtractRequest.from_event(request)
    if credentials_block:
        extract = replace(extract, s3_credentials=load_published_credentials(credentials_block))
    result = extract_granule(extract)
    get_run_logger().info(
        "granule %s: %s, %d points in %d cells%s",
        extract.name,
        result.status,
        result.points,
        result.parents,
        f" ({result.reason})" if result.reason else "",
    )
    return result.to_dict()
