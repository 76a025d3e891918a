"""Flow ``watch-cycles``: start a ``process-cycle`` run for each new ICESat-2 cycle.

Run on a schedule (see ``prefect.yaml``). Each tick looks at the most recent
cycles whose granules should all be in CMR by now, skips those the store
already holds in full, skips those CMR has no granules for yet, and starts
one ``process-cycle`` run per remaining cycle through its deployment. Ticks
are idempotent: a cycle whose run exists — running, finished or failed and
waiting for a retry from the UI — is never started twice.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger

from magg.tasks.setup import load_pipeline_config
from magg.tasks.watch import (
    cycle_done,
    cycle_granules_in_cmr,
    due_cycles,
    late_cells,
    start_cycle_run,
)
from magg_core.grid.plan import cycle_store


@flow(name="watch-cycles", log_prints=True)
def watch_cycles(
    store: str,
    deployment: str = "process-cycle/lambda",
    region: str = "antarctica",
    config: str = "atl06",
    latency_days: float = 45.0,
    lookback_cycles: int = 2,
    cmr_url: str | None = None,
    keep_fragments: bool = True,
) -> dict[str, str]:
    """Start the runs of cycles that are complete in CMR and not yet done in the store.

    Parameters
    ----------
    store
        Store URL template; ``{cycle}`` becomes the two-digit cycle number,
        e.g. ``s3://bucket/atl06/cycle{cycle}.zarr``. Each cycle is its own store.
    deployment
        The ``process-cycle`` deployment that runs a cycle (``flow/deployment``).
    region, config, cmr_url
        Passed to each cycle run, and used here to ask CMR the same question.
    latency_days
        How long after a cycle's nominal end its last granules are expected
        in CMR. Earlier, a run would grid an incomplete cycle.
    lookback_cycles
        How many of the latest due cycles each tick checks: more than one, so
        a missed tick or an unfinished cycle is picked up by the next. A done
        cycle is asked of CMR again: granules published late (new names or
        revisions) start a run that re-grids only the cells they change.
    keep_fragments
        Passed to each run: keeping a cycle's fragments lets a late granule's
        run read only that granule, not every granule of the cells it touches.

    Returns
    -------
    dict
        Cycle number → what happened: ``done``, ``not in CMR yet``,
        ``run <name> <id> (<state>)`` for the run started or found, or
        ``late granules in N cells: run …`` for a done cycle's update.
    """
    logger = get_run_logger()
    pipeline = load_pipeline_config(config)
    cycles = due_cycles(datetime.now(UTC), timedelta(days=latency_days), lookback_cycles)
    outcome: dict[str, str] = {}
    for cycle in cycles:
        store_path = cycle_store(store, cycle)
        parameters = {
            "store": store_path,
            "region": region,
            "config": config,
            "keep_fragments": keep_fragments,
        }
        if cmr_url:
            parameters["cmr_url"] = cmr_url
        if cycle_done(store_path, pipeline):
            stale, outside, catalog = late_cells(store_path, pipeline, cycle, region, cmr_url)
            if outside:
                logger.warning(
                    "cycle %d: %d cells with late granules are outside the store's template "
                    "(first: %s); re-grid the cycle into a new store to include them",
                    cycle,
                    len(outside),
                    outside[0],
                )
            if not stale:
                outcome[str(cycle)] = "done"
            else:
                cells = [str(p) for p in stale]
                run = start_cycle_run(
                    deployment, cycle, {**parameters, "cells": cells}, update=catalog
                )
                state = run.state.name if run.state else "unknown"
                outcome[str(cycle)] = (
                    f"late granules in {len(stale)} cells: run {run.name} {run.id} ({state})"
                )
        elif cycle_granules_in_cmr(cycle, region, cmr_url) == 0:
            outcome[str(cycle)] = "not in CMR yet"
        else:
            run = start_cycle_run(deployment, cycle, parameters)
            state = run.state.name if run.state else "unknown"
            outcome[str(cycle)] = f"run {run.name} {run.id} ({state})"
        logger.info("cycle %d: %s", cycle, outcome[str(cycle)])
    return outcome
