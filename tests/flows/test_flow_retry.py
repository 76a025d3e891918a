"""Failure and retry of ``process-cycle``: the UI's Retry re-runs only the failed cells.

Everything is real except the fault: moto S3 behind a loopback proxy that
refuses the chunk writes of three cells (``AccessDenied``, as a bucket policy
would) until the test clears it, a real Prefect server, the flow and its
tasks unchanged. The proxy also counts every write, which is how "no chunk is
written twice" is checked: by what reached S3, not by what the code meant to do.
"""

from __future__ import annotations

import json
import time

import pytest
from prefect import flow

from magg.flows.process_cell import process_cell_flow
from magg.flows.process_cycle import process_cycle
from magg.tasks.cells import grid_cells_locally
from magg.tasks.workers import worker_pool
from magg_core.config import load_config
from magg_core.errors import CellsFailedError
from magg_core.grid.plan import plan_cells
from magg_core.store.arrays import create_template, open_store, read_template
from magg_core.urls import granule_name
from tests.flow_support import (
    SAMPLE,
    S3Error,
    assert_store_matches_oracle,
    cell_task_runs,
    chunk_writes,
    flow_run_artifacts,
    read_flow_run,
    record_writes,
    records_by_parent,
    retry_like_the_ui,
    s3_proxy,
    sample_in_s3,
    store_arrays,
)
from tests.oracle import STATISTICS

IN, OUT = "magg-retry-in", "magg-retry-out"
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def sample(moto_server, tmp_path_factory):
    sample = sample_in_s3(moto_server, tmp_path_factory.mktemp("retry"), IN, **SAMPLE)
    moto_server.create_bucket(OUT)
    return sample


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """Every S3 client of the run (threads of this process) goes through the proxy."""
    with s3_proxy(s3_env.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy


def deny_chunk_writes(store_key: str, chunks: set[int]):
    """A fault refusing every statistic chunk of the given chunk indices."""

    def fault(method, bucket, key, access_key):
        parts = key.removeprefix(f"{store_key}/12/").split("/")
        if (
            bucket == OUT
            and method in ("PUT", "DELETE")
            and key.startswith(f"{store_key}/12/")
            and len(parts) == 3
            and parts[0] in STATISTICS
            and int(parts[2]) in chunks
        ):
            return S3Error(403, "AccessDenied", "Access Denied")
        return None

    return fault


def by_cell(flow_run_id, attempt: int, groups: list[list[int]] | None) -> dict[int, object]:
    """Each parent's task run in one attempt of the flow run: its own, or its group's."""
    if groups is None:
        return {int(r.name.removeprefix("cell-")): r for r in cell_task_runs(flow_run_id, attempt)}
    first = {g[0]: g for g in groups}
    runs = cell_task_runs(flow_run_id, attempt, prefix="cells-")
    assert len(runs) == len(groups)
    return {p: r for r in runs for p in first[int(r.name[6:].split("+")[0])]}


@pytest.mark.parametrize("task_runs", [None, 3], ids=["a-task-run-a-cell", "cells-in-3-groups"])
def test_retrying_the_failed_run_reruns_exactly_the_failed_cells(
    sample, proxy, prefect_server, monkeypatch, task_runs
):
    """Also when the local backend grids several cells a task run: the retry re-runs the
    groups of the failed cells, and in them only the failed cells reach the store."""
    parents = sample.parents
    with_data = [i for i, p in enumerate(parents) if p in sample.oracle]
    failing_chunks = set(with_data[:3])
    groups = None
    if task_runs:  # groups of two; one cell fails in each of the first two groups
        monkeypatch.setattr("magg.tasks.dispatch.GROUP_TASK_RUNS", task_runs)
        groups = [parents[i : i + 2] for i in range(0, len(parents), 2)]
        failing_chunks = {i for i in with_data if i < 4 and i % 2 == 0}
        assert len(failing_chunks) == 2 and {i + 1 for i in failing_chunks} <= set(with_data)
    store = f"s3://{OUT}/retry-{task_runs}.zarr"
    failing = {parents[i] for i in failing_chunks}
    assert len(parents) - len(failing) >= 3

    proxy.fault = deny_chunk_writes(f"retry-{task_runs}.zarr", failing_chunks)
    first = process_cycle(
        catalog=str(sample.catalog_path),
        store=store,
        credentials="environment",
        granule_mirror=sample.mirror,
        return_state=True,
    )
    flow_run_id = first.state_details.flow_run_id

    # The run failed, after every other cell finished, naming the failed cells.
    assert first.is_failed()
    with pytest.raises(CellsFailedError):
        first.result()
    assert all(str(p) in first.message for p in failing)
    runs = by_cell(flow_run_id, 1, groups)
    assert set(runs) == set(parents)
    failed_runs = {p for p, r in runs.items() if r.state.is_failed()}
    if groups is None:
        assert failed_runs == failing
    else:  # the groups of the failed cells
        assert failed_runs == {p for g in groups if failing & set(g) for p in g}
    assert all(r.state.is_completed() for p, r in runs.items() if p not in failed_runs)
    # AccessDenied cannot succeed on a retry: not one retry was spent on it.
    assert all(runs[p].run_count == 1 for p in failing)
    # Each cell that raised still has a record, saying why: none reads "not yet run".
    records = records_by_parent(store)
    assert set(records) == set(parents)
    assert {p for p, r in records.items() if r.result.status == "failed"} == failing
    assert all("denied" in records[p].result.error.lower() for p in failing)

    # Tracking survived the failure: per-cell table, progress, summary.
    artifacts = flow_run_artifacts(flow_run_id)
    rows = {int(r["parent_morton"]): r for r in json.loads(artifacts["magg-cells"].data)}
    assert set(rows) == set(parents)
    assert {p for p, r in rows.items() if r["status"] == "failed"} == failing
    assert all(
        "AccessDenied" in rows[p]["error"] or "denied" in rows[p]["error"].lower() for p in failing
    )
    assert artifacts["magg-cells-progress"].data == 100.0
    assert f"**{len(failing)} cells incomplete**" in artifacts["magg-summary"].data

    # The fault is cleared; the operator presses Retry.
    proxy.fault = None
    written_before = proxy.mark()
    second = retry_like_the_ui(process_cycle, flow_run_id)

    assert second.is_completed(), second.message
    assert read_flow_run(flow_run_id).run_count == 2
    rerun = {p: r.state.name for p, r in by_cell(flow_run_id, 2, groups).items()}
    assert rerun == {p: ("Completed" if p in failed_runs else "Cached") for p in parents}
    # What reached S3 during the retry: the failed cells' chunks and records, nothing else.
    assert {i for _, i in chunk_writes(proxy, store, written_before)} == failing_chunks
    assert set(record_writes(proxy, store, written_before)) == failing
    # Over both runs, every chunk was written exactly once; the failed cells' records
    # twice (failed, then ok), every other record once.
    writes = chunk_writes(proxy, store)
    assert set(writes) == {(s, i) for s in STATISTICS for i in range(len(parents))}
    assert set(writes.values()) == {1}
    assert record_writes(proxy, store) == {p: 2 if p in failing else 1 for p in parents}

    records = records_by_parent(store)
    assert set(records) == set(parents)
    assert {r.result.status for r in records.values()} <= {"ok", "empty", "no_granules"}
    assert_store_matches_oracle(store, sample)
    summary = json.loads(json.dumps(second.result()))
    assert summary["cells"] == len(parents) and summary["failed_cells"] == []


@pytest.fixture
def slow_cell(sample, proxy):
    """A small cell in a fresh store whose first granule read stalls past ``TIMEOUT_S``."""

    def make(store: str, *others: int):
        """The slow cell's request and the store's id; with ``others``, the requests of
        the slow cell and of those (the slow one first), and the store's id."""
        config = load_config()
        create_template(open_store(store), config, sample.catalog.parents, {})
        store_id = read_template(open_store(store), config).id
        parent = min(sample.oracle, key=lambda p: sample.oracle[p]["count"].sum())
        requests = plan_cells(
            sample.catalog, config, store, cells=[parent, *others], granule_mirror=sample.mirror
        )
        requests.sort(key=lambda r: r.parent_morton != parent)
        stalled = []

        def stall_first_read(method, bucket, key, access_key):
            if bucket == IN and not stalled:
                stalled.append(key)
                time.sleep(TIMEOUT_S + 1)
            return None

        proxy.fault = stall_first_read
        return (requests if others else requests[0]), store_id

    return make


def test_a_cell_past_its_timeout_writes_nothing_and_is_retried(slow_cell, proxy, prefect_server):
    """The deadline fence: an attempt that overran stops before writing; the retry writes once."""
    store = f"s3://{OUT}/timeout.zarr"
    request, store_id = slow_cell(store)

    @flow
    def one_cell():
        # Same task, no backoff: the property is what is retried, not how long it waits.
        quick = grid_cells_locally.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
        with worker_pool(1) as workers:
            return quick([request], store_id, TIMEOUT_S, workers, return_state=True)

    state = one_cell()
    assert state.is_completed()
    (run,) = cell_task_runs(state.state_details.flow_run_id)
    assert run.run_count == 2  # the first attempt timed out, the retry did not
    writes = chunk_writes(proxy, store)
    assert set(writes) == {(s, request.chunk_idx) for s in STATISTICS}
    assert set(writes.values()) == {1}
    assert record_writes(proxy, store) == {request.parent_morton: 1}


def test_a_group_retried_after_a_timeout_redoes_only_that_cell(
    slow_cell, sample, proxy, prefect_server
):
    """Several cells a task run: one overran, the others completed; Prefect retries the
    group, and the retry writes the overrun cell alone: every chunk and record once."""
    store = f"s3://{OUT}/timeout-group.zarr"
    slowest = min(sample.oracle, key=lambda p: sample.oracle[p]["count"].sum())
    others = [p for p in sample.oracle if p != slowest][:2]
    requests, store_id = slow_cell(store, *others)
    assert len(requests) == 3

    @flow
    def one_group():
        quick = grid_cells_locally.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
        with worker_pool(1) as workers:
            return quick(requests, store_id, TIMEOUT_S, workers, return_state=True)

    state = one_group()
    assert state.is_completed(), state.message
    assert sorted(r.parent_morton for r in state.result()) == sorted(
        r.parent_morton for r in requests
    )
    assert {r.status for r in state.result()} == {"ok"}
    (run,) = cell_task_runs(state.state_details.flow_run_id, prefix="cells-")
    assert run.run_count == 2
    writes = chunk_writes(proxy, store)
    assert set(writes) == {(s, r.chunk_idx) for s in STATISTICS for r in requests}
    assert set(writes.values()) == {1}
    assert record_writes(proxy, store) == {r.parent_morton: 1 for r in requests}


def test_an_ecs_child_run_past_its_timeout_writes_nothing(slow_cell, proxy, prefect_server):
    store = f"s3://{OUT}/timeout-child.zarr"
    request, _ = slow_cell(store)

    state = process_cell_flow(
        request.to_event(include_credentials=False), timeout_s=TIMEOUT_S, return_state=True
    )

    assert state.is_failed() and "passed its deadline; nothing was written" in state.message
    assert chunk_writes(proxy, store) == {} and record_writes(proxy, store) == {}


def _remove_granule(sample, moto) -> tuple[str, bytes, dict[int, str]]:
    """Delete one granule of the mirror; the statuses its cells must then have."""
    cells = {p: [granule_name(g.s3) for g in sample.catalog.cells[p]] for p in sample.parents}
    name = max(
        {n for names in cells.values() for n in names},
        key=lambda n: sum(n in names and len(names) > 1 for names in cells.values()),
    )
    key = f"ATL06/{name}"
    body = moto.client.get_object(Bucket=IN, Key=key)["Body"].read()
    moto.client.delete_object(Bucket=IN, Key=key)
    expected = {p: "partial" if len(n) > 1 else "failed" for p, n in cells.items() if name in n}
    assert "partial" in expected.values()
    return key, body, expected


@pytest.mark.parametrize("accept_partial", [False, True], ids=["default", "accept-partial"])
def test_a_cell_that_lost_a_granule_is_never_ok_nor_cached(
    sample, s3_env, prefect_server, accept_partial
):
    """A granule missing (404) makes its cells partial: the run fails unless partial cells
    are accepted; either way a later run, once the granule is back, recomputes exactly
    those cells and takes every complete cell from the cache."""
    store = f"s3://{OUT}/partial-{accept_partial}.zarr"
    key, body, lost = _remove_granule(sample, s3_env)
    partial = {p for p, status in lost.items() if status == "partial"}
    run = dict(
        catalog=str(sample.catalog_path),
        store=store,
        credentials="environment",
        granule_mirror=sample.mirror,
        accept_partial=accept_partial,
        return_state=True,
    )
    try:
        first = process_cycle(**run)
    finally:
        s3_env.client.put_object(Bucket=IN, Key=key, Body=body)

    fails = accept_partial is False or "failed" in lost.values()
    assert first.is_failed() is fails, first.message
    summary = first.result(raise_on_failure=False)
    summary = summary.summary if isinstance(summary, CellsFailedError) else summary
    assert summary["status_counts"].get("partial") == len(partial)
    incomplete = {p for p, s in lost.items() if s == "failed" or not accept_partial}
    assert set(map(int, summary["failed_cells"])) == incomplete
    records = records_by_parent(store)
    for parent, status in lost.items():
        result = records[parent].result
        assert result.status == status
        assert [f.url.rsplit("/", 1)[1] for f in result.files_failed] == [key.split("/")[1]]
        assert "not found" in result.files_failed[0].reason
    rows = json.loads(flow_run_artifacts(first.state_details.flow_run_id)["magg-cells"].data)
    assert {int(r["parent_morton"]): r["status"] for r in rows if r["granules_failed"]} == lost
    if accept_partial:  # written from the granules that could be read: fewer points
        counts = store_arrays(store)["count"]
        n = load_config().output.children_per_parent
        for parent in partial:
            i = sample.parents.index(parent)
            assert 0 < counts[i * n : (i + 1) * n].sum() < sample.oracle[parent]["count"].sum()

    # The same run again, the granule back: only the incomplete cells run.
    second = process_cycle(**run)

    assert second.is_completed(), second.message
    states = {
        int(r.name.removeprefix("cell-")): r.state.name
        for r in cell_task_runs(second.state_details.flow_run_id)
    }
    assert states == {p: "Completed" if p in lost else "Cached" for p in sample.parents}
    assert_store_matches_oracle(store, sample)
    assert {r.result.status for r in records_by_parent(store).values()} <= {
        "ok",
        "empty",
        "no_granules",
    }
