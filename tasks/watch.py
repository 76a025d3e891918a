"""Tasks of the ``watch-cycles`` flow: which cycles are due, done, published; start one.

"Due" is calendar arithmetic (a cycle's nominal end plus the latency with
which its granules reach CMR); "done" is read from the store's durable
per-cell records, not from Prefect's history, which may be gone or belong to
another server; "published" asks CMR for granules whose *name* carries the
cycle (the dates of a cycle are approximate, the name is exact); "late" asks
CMR again for a done cycle and compares each cell's granules with its record.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from magg_core.catalog.catalog import build_catalog
from magg_core.catalog.cmr import GranuleSearch, record_granule_name, search_granules
from magg_core.catalog.regions import load_region
from magg_core.config import PipelineConfig
from magg_core.cycles import cycle_query_range, cycle_range, granule_fields
from magg_core.grid.plan import cells_to_update
from magg_core.store.arrays import open_store, read_template
from magg_core.store.records import proven_cells, read_records

FINISHED = frozenset({"ok", "empty", "no_granules"})
"""Record statuses that need no further run; ``failed`` cells do."""


def due_cycles(now: datetime, latency: timedelta, lookback: int) -> list[int]:
    """The last ``lookback`` cycles whose nominal end plus ``latency`` is past ``now``.

    Looking back more than one cycle lets a tick that was missed, or a
    cycle whose run failed before it started any cell, be picked up later.
    """
    last = 0
    while cycle_range(last + 1).end + latency <= now:
        last += 1
    return list(range(max(1, last - lookback + 1), last + 1))


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10)
def cycle_done(store_path: str, config: PipelineConfig) -> bool:
    """True when the store has a template and a finished record for every parent cell."""
    store = open_store(store_path, read_only=True)
    template = read_template(store, config)
    if template is None:
        return False
    records = read_records(store, config)
    return all(
        int(parent) in records and records[int(parent)].result.status in FINISHED
        for parent in template.parents
    )


@task(cache_policy=NONE, retries=2, retry_delay_seconds=30)
def late_cells(
    store_path: str, config: PipelineConfig, cycle: int, region: str, cmr_url: str | None
) -> tuple[list[int], list[int], str]:
    """The cells of a gridded cycle whose granules CMR now lists differently.

    Builds the cycle's catalog as ``process-cycle`` would and compares each
    cell's granules with the store's record of it
    (:func:`magg_core.grid.plan.cells_to_update`); a cell whose record no longer
    proves its output (:func:`magg_core.store.records.proven_cells`) is stale as
    well. Returns the stale cells, the
    catalog cells outside the store's template, and the catalog's fingerprint
    (which names this state of the archive) -- combined with the lost cells'
    records when there are any, which names this state of the store.
    """
    catalog = build_catalog(
        cycle=cycle, region=region, parent_order=config.output.parent_order, cmr_url=cmr_url
    )
    store = open_store(store_path, read_only=True)
    template = read_template(store, config)
    records = read_records(store, config)
    # A record stands for its cell only while its chunks and staging object are
    # there as written (records.proven_cells); a cell that lost them is stale too.
    own = {parent: record.fingerprint for parent, record in records.items()}
    proven = proven_cells(store, config, own, records)
    stale, outside = cells_to_update(catalog, template.parents, proven, config.hash)
    lost = [f"{p} {records[p].written_at}" for p in sorted(records) if p not in proven]
    if not lost:
        return stale, outside, catalog.fingerprint
    # The state names the lost records too, so a loss after an update run of the
    # same catalog starts a run of its own (start_cycle_run's idempotency key).
    state = hashlib.sha256("\n".join([catalog.fingerprint, *lost]).encode()).hexdigest()
    return stale, outside, state


@task(cache_policy=NONE, retries=2, retry_delay_seconds=30)
def cycle_granules_in_cmr(cycle: int, region: str, cmr_url: str | None) -> int:
    """How many granules of ``cycle`` CMR lists over the region's bounding box.

    The same search ``process-cycle`` makes for its catalog (ATL06 version
    007 from NSIDC's cloud provider), counted by the cycle in each name.
    """
    search = GranuleSearch(
        time_range=cycle_query_range(cycle), bounding_box=load_region(region).bounding_box()
    )
    names = (record_granule_name(r) for r in search_granules(search, url=cmr_url))
    return sum(1 for name in names if (parsed := granule_fields(name)) and parsed.cycle == cycle)


@task(cache_policy=NONE, task_run_name="start-cycle-{cycle}")
def start_cycle_run(
    deployment: str, cycle: int, parameters: dict[str, Any], update: str | None = None
) -> FlowRun:
    """Create the cycle's flow run, or find the one an earlier tick created.

    The idempotency key names the cycle, the deployment and the store, so
    two overlapping ticks — or a tick after a run that is still going, or
    that failed and awaits a retry from the UI — get the same run back
    instead of starting a second one. An ``update`` (the fingerprint of the
    catalog that made cells stale) makes a run of its own, once per state of
    the archive. The run is not a subflow of the
    watcher (``as_subflow=False``): cancelling or retrying a watcher tick
    must not touch an hours-long cycle run.
    """
    target = f"{deployment}\n{parameters['store']}\n{update or ''}".encode()
    key = f"process-cycle-{cycle:02d}-{hashlib.sha256(target).hexdigest()[:16]}"
    return run_deployment(
        deployment,
        parameters={"cycle": cycle, **parameters},
        flow_run_name=f"cycle-{cycle:02d}" + (f"-update-{update[:8]}" if update else ""),
        idempotency_key=key,
        timeout=0,
        as_subflow=False,
    )
