"""Tasks of the ``height-change`` flow: plan, output template, one task per parent, report.

A parent's task has the policy of process-cycle's cells (:func:`magg.tasks.cells.work_task`:
retries on transient errors only, a persisted result, a cache key over
everything that determines the output), so a re-run of the flow -- or the
Prefect UI's Retry -- fits only the parents that failed. The fit runs in a
worker process (:mod:`tasks.workers`); a failed parent raises with its result
and so is never cached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext

from magg.tasks.caching import parent_cache_key
from magg.tasks.cells import raise_if_incomplete, work_task
from magg.tasks.workers import process_height_change_within
from magg_core.config import PipelineConfig
from magg_core.height_change.cell import fit_arrays, height_change_fingerprint, record_height_change
from magg_core.height_change.plan import (
    HeightChangePlan,
    check_output_provenance,
    plan_height_change,
)
from magg_core.report.summary import cell_table, incomplete_cells, summarize, to_markdown
from magg_core.schema import CellResult, FitOptions, HeightChangeRequest
from magg_core.store.arrays import create_template, open_store, read_template
from magg_core.store.records import proven_cells


def height_change_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A parent's :func:`~magg.tasks.caching.parent_cache_key`: its input fingerprint (cycle
    stores, granule names, config, fit options, t0, magg version), the store and its
    identity."""
    request: HeightChangeRequest = parameters["request"]
    return parent_cache_key(
        "dhdt",
        request.parent_morton,
        height_change_fingerprint(request),
        request.store_path,
        parameters["store_id"],
    )


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def plan_cycles(
    cycles: Sequence[int], stores: str | Sequence[str], config: PipelineConfig
) -> HeightChangePlan:
    """Check the cycle stores, list each parent's fragments (magg_core.height_change.plan)."""
    return plan_height_change(cycles, stores, config)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def prepare_output(output: str, plan: HeightChangePlan, options: FitOptions) -> str:
    """Create (or verify) the output store's template; return its identity for the cache keys."""
    provenance = plan.provenance(options)
    check_output_provenance(output, plan.config, provenance, None)
    store = open_store(output)
    create_template(store, plan.config, plan.parents, provenance, arrays=fit_arrays(plan.epoch))
    return read_template(store, plan.config).id


def _fit_parent(
    request: HeightChangeRequest, store_id: str, timeout_s: int, workers: Executor
) -> CellResult:
    """Fit one parent in a worker process; a failed parent raises with its result."""
    result = workers.submit(process_height_change_within, request, timeout_s).result()
    return raise_if_incomplete(result)


fit_parent_locally = work_task(
    _fit_parent,
    name="fit-parent",
    persist_result=True,
    cache_key_fn=height_change_cache_key,
    task_run_name="cell-{request.parent_morton}",
)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def proven_fits(
    output: str, config: PipelineConfig, requests: Sequence[HeightChangeRequest]
) -> set[int]:
    """The parents whose record proves their fit is in the output store, as for the cells
    of a cycle (:func:`magg.tasks.cells.proven_parents`): the others refresh their cache."""
    fingerprints = {r.parent_morton: height_change_fingerprint(r) for r in requests}
    return set(proven_cells(open_store(output), config, fingerprints))


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record_failed_parents(
    requests: Sequence[HeightChangeRequest], failures: Mapping[int, str]
) -> None:
    """A ``failed`` record for each parent whose task ended without a result."""
    for request in requests:
        result = CellResult(
            parent_morton=request.parent_morton,
            status="failed",
            granule_count=request.granule_count,
            error=failures[request.parent_morton],
        )
        record_height_change(request, result)


@task(cache_policy=NONE)
def report_height_change(
    results: Sequence[CellResult],
    failures: Mapping[int, str],
    plan: HeightChangePlan,
    *,
    wall_s: float,
    output: str,
) -> dict[str, Any]:
    """Publish the per-parent table and a summary; return the summary as a dict."""
    summary = summarize(results, failed=len(failures), wall_s=wall_s)
    create_table_artifact(
        cell_table(results, failures),
        key="magg-height-change-cells",
        description=f"one row per parent of {output}",
    )
    rows = [("reference epoch t0", plan.epoch.isoformat())] + [
        (f"cycle {c.cycle}", f"{c.store_path}: {c.fragments:,} granules with fragments")
        for c in plan.cycles
    ]
    markdown = to_markdown(
        summary, title=f"magg height change into {output}", lambda_cost=False, rows=rows
    )
    incomplete = incomplete_cells(results, failures)
    if incomplete:
        markdown += (
            f"\n\n**{len(incomplete)} parents failed**: retry the flow run to re-fit only them."
        )
    create_markdown_artifact(
        markdown, key="magg-height-change-summary", description="height-change summary"
    )
    get_run_logger().info("%s", summary.one_line("parents", "points fitted"))
    return {
        **asdict(summary),
        "failed_cells": [str(p) for p in incomplete],
        "store": output,
        "reference_epoch": plan.epoch.isoformat(),
        "markdown": markdown,
    }
