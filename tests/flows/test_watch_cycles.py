"""``watch-cycles``: scheduled ticks start one ``process-cycle`` run per new cycle, once.

The module's server is registered the way the guide starts: a fresh
``prefect server start``, ``deployments/work-pools.sh`` (a real ECS-type
pool: nothing here runs a cell) and ``prefect deploy --all`` from the
repository's ``prefect.yaml``, with no AWS credentials anywhere — the first
test checks what that registered. Each tick is then a flow run of
``watch-cycles/antarctica`` created through the API, as the scheduler creates
them, and executed by ``prefect flow-run execute`` — the command a worker
runs — with the deployment's pull steps. CMR is the loopback fake, which
"publishes" the newest cycle between ticks; the previous cycle is already
gridded in its store (by magg_core itself), so only the new one is due.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from magg.flows.process_cycle import process_cycle
from magg.tasks.watch import due_cycles
from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import load_config
from magg_core.cycles import cycle_query_range, cycle_range
from magg_core.granules.sample import write_sample
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import cycle_store, plan_cells
from magg_core.store.arrays import create_template, open_store, read_template
from magg_core.store.fragments import read_extract_record
from tests.deploy_support import ALL_DEPLOYMENTS, BIN, PrefectServer, prefect_cli
from tests.fakes.cmr import FakeCmr
from tests.flow_support import cell_task_runs, store_arrays
from tests.oracle import reference_statistics

LATENCY = timedelta(days=45)
TARGET = "process-cycle/ecs"


def test_due_cycles_wait_for_the_latency_after_a_cycle_ends():
    end_30 = cycle_range(30).end
    assert due_cycles(end_30 + LATENCY, LATENCY, 2) == [29, 30]
    assert due_cycles(end_30 + LATENCY - timedelta(seconds=1), LATENCY, 2) == [28, 29]
    assert due_cycles(cycle_range(2).end + LATENCY, LATENCY, 5) == [1, 2]
    assert due_cycles(cycle_range(1).end, LATENCY, 2) == []


def test_store_template_is_filled_per_cycle():
    assert cycle_store("s3://b/atl06/cycle{cycle}.zarr", 7) == "s3://b/atl06/cycle07.zarr"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A fresh server with the pools and every deployment registered, offline."""
    workdir = tmp_path_factory.mktemp("registered")
    server = PrefectServer(workdir).start()
    try:
        env = server.client_env(workdir / "home")
        prefect_cli(["deployments/work-pools.sh"], env)
        prefect_cli(["prefect", "--no-prompt", "deploy", "--all"], env)
        yield server, env
    finally:
        server.stop()


def test_deploy_all_works_offline_against_a_fresh_server(registered):
    """The guide's first commands registered every deployment, with no AWS access."""
    server, _ = registered
    pools = {p["name"]: p for p in server.api("POST", "/work_pools/filter", json={})}
    assert pools["magg-process"]["type"] == "process"
    assert pools["magg-ecs"]["type"] == "ecs"
    template = pools["magg-ecs"]["base_job_template"]
    task_definition = template["job_configuration"]["task_definition"]
    assert task_definition["runtimePlatform"]["cpuArchitecture"] == "{{ cpu_architecture }}"
    assert template["variables"]["properties"]["match_latest_revision_in_family"]["default"]

    for name, pool in ALL_DEPLOYMENTS.items():
        deployment = server.deployment(name)
        assert deployment["work_pool_name"] == pool, name
        steps = [next(iter(step)) for step in deployment["pull_steps"]]
        assert steps[0] == "deployments.steps.project_directory", name

    cell = server.deployment("process-cell/ecs")
    variables = cell["job_variables"]
    assert {"image", "cpu", "memory", "env"} <= variables.keys()
    assert (variables["cpu"], variables["memory"]) == (2048, 8192)
    assert variables["env"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "s3-bucket/magg-results"
    assert "deployments.steps.earthdata_login" not in json.dumps(cell["pull_steps"])

    assert server.deployment("process-cycle/ecs")["parameters"] == {
        "backend": "ecs",
        "ecs_deployment": "process-cell/ecs",
    }
    watch = server.deployment("watch-cycles/antarctica")
    [schedule] = watch["schedules"]
    assert schedule["schedule"]["cron"] == "0 6 * * *" and schedule["active"]
    assert "{cycle}" in watch["parameters"]["store"]
    change = server.deployment("height-change/local")
    assert change["parameters"] == {"stores": watch["parameters"]["store"], "backend": "local"}


def _granules(directory, cycle):
    granules = write_sample(
        directory, n_granules=1, extent_km=20, centre=(-78.0, 40.0), seed=3, cycle=cycle
    )
    return granules, catalog_from_records([g.umm for g in granules], cycle=cycle)


def _grid(store_path, catalog, mirror):
    """Grid a whole cycle with magg_core, as a finished ``process-cycle`` run leaves it."""
    config = load_config()
    create_template(open_store(store_path), config, catalog.parents, {})
    for request in plan_cells(catalog, config, store_path, granule_mirror=str(mirror)):
        assert process_cell(request).status == "ok"


def _ticks(server, env, cwd, parameters, n: int) -> list[dict]:
    """``n`` scheduled ticks, executed at the same time as a worker would."""
    runs = [server.create_run("watch-cycles/antarctica", parameters) for _ in range(n)]
    processes = [
        subprocess.Popen(
            [str(BIN / "prefect"), "flow-run", "execute", run["id"]],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for run in runs
    ]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-4000:]
    finished = [server.flow_run(run["id"]) for run in runs]
    assert [r["state"]["type"] for r in finished] == ["COMPLETED"] * n
    return finished


def _newest_due_cycle() -> int:
    now = datetime.now(UTC)
    return max(c for c in range(1, 100) if cycle_range(c).end + LATENCY <= now)


def test_two_overlapping_ticks_start_one_run_for_a_newly_published_cycle(registered, tmp_path):
    server, env = registered
    newest = _newest_due_cycle()
    previous = newest - 1
    store = str(tmp_path / "stores" / "cycle{cycle}.zarr")
    old, old_catalog = _granules(tmp_path / "old", previous)
    new, _ = _granules(tmp_path / "new", newest)
    _grid(cycle_store(store, previous), old_catalog, tmp_path / "old")
    cmr = FakeCmr(items=[g.umm for g in old]).start()

    parameters = {
        "store": store,
        "deployment": TARGET,
        "cmr_url": cmr.url,
        "latency_days": LATENCY.days,
    }

    try:
        [first] = _ticks(server, env, tmp_path, parameters, 1)
        assert server.flow_runs(TARGET) == []  # the newest cycle is not in CMR yet
        assert any(f"cycle {previous}: done" in m for m in server.logs([first["id"]]))
        ranges = {",".join(cycle_query_range(c).isoformat()) for c in (previous, newest)}
        asked = cmr.search_requests()
        queried = {dict(r.params).get("temporal[]") for r in asked}
        assert queried == ranges  # the finished cycle is asked again, for late granules

        cmr.items.extend(g.umm for g in new)  # CMR publishes the new cycle
        overlapping = _ticks(server, env, tmp_path, parameters, 2)
    finally:
        cmr.stop()

    [run] = server.flow_runs(TARGET)
    assert run["name"] == f"cycle-{newest:02d}"
    assert run["state"]["type"] == "SCHEDULED"
    assert run["parameters"] == {
        "backend": "ecs",  # the deployment's own parameters, and the watcher's:
        "ecs_deployment": "process-cell/ecs",
        "cycle": newest,
        "store": cycle_store(store, newest),
        "region": "antarctica",
        "config": "atl06",
        "keep_fragments": True,
        "cmr_url": cmr.url,
    }
    for tick in overlapping:
        assert any(run["id"] in m for m in server.logs([tick["id"]])), "each tick names the run"
    assert server.flow_runs("process-cycle/lambda") == []


def test_a_late_granule_regrids_only_the_cells_it_changes(registered, prefect_server, tmp_path):
    """A cycle gridded in full; then CMR lists one more granule of it. The next tick starts
    one run for exactly the cells that granule crosses; that run reads only the late
    granule (the others' fragments were kept) and leaves the store equal to the oracle
    of every granule. The tick after that finds the cycle done."""
    server, env = registered
    cycle = _newest_due_cycle()
    granules = write_sample(
        tmp_path / "granules", n_granules=3, extent_km=40, centre=(-78.0, 40.0), seed=3,
        cycle=cycle,
    )  # fmt: skip
    early, late = granules[:2], granules[2]
    store = cycle_store(str(tmp_path / "stores" / "cycle{cycle}.zarr"), cycle)
    mirror = str(tmp_path / "granules")
    run = {"cycle": cycle, "store": store, "credentials": "none", "granule_mirror": mirror}
    cmr = FakeCmr(items=[g.umm for g in early]).start()
    try:
        first = process_cycle(**run, cmr_url=cmr.url, keep_fragments=True, return_state=True)
        assert first.is_completed(), first.message
        gridded = {int(p) for p in read_template(open_store(store), load_config()).parents}
        touched = {p for p, gs in catalog_from_records([late.umm], cycle=cycle).cells.items()}
        assert touched <= gridded, "the late granule crosses only cells the store has"

        cmr.items.append(late.umm)  # CMR publishes a granule of the gridded cycle
        parameters = {"store": str(tmp_path / "stores" / "cycle{cycle}.zarr"), "cmr_url": cmr.url}
        parameters |= {"deployment": TARGET, "latency_days": LATENCY.days}
        [tick] = _ticks(server, env, tmp_path, parameters, 1)
        updates = [r for r in server.flow_runs(TARGET) if "-update-" in r["name"]]
        [update] = updates
        assert update["name"].startswith(f"cycle-{cycle:02d}-update-")
        assert sorted(map(int, update["parameters"]["cells"])) == sorted(touched)
        assert update["parameters"]["keep_fragments"] is True
        assert any("late granules in" in m for m in server.logs([tick["id"]]))

        # The worker's part, here: the update run's parameters on the local backend.
        wanted = {k: v for k, v in update["parameters"].items() if k in WATCHED}
        second = process_cycle(**wanted, credentials="none", granule_mirror=mirror,
                               return_state=True)  # fmt: skip
        assert second.is_completed(), second.message
        summary = second.result()
        run_id = second.state_details.flow_run_id
        extracts = {
            r.name.removeprefix("extract-"): r for r in cell_task_runs(run_id, prefix="extract-")
        }
        cells = {int(r.name.removeprefix("cell-")) for r in cell_task_runs(run_id)}
        assert cells == touched
        assert summary["granules_extracted"] == len(extracts) >= 1
        read = sum(1 for n in extracts if n == late.name)
        assert read == 1 and summary["extract_bytes_fetched"] > 0
        assert _fetched_only(store, late.name, summary)

        [again] = _ticks(server, env, tmp_path, parameters, 1)
        assert any(f"cycle {cycle}: done" in m for m in server.logs([again["id"]]))
        assert [r["id"] for r in server.flow_runs(TARGET) if "-update-" in r["name"]] == [
            update["id"]
        ]

        # A chunk of the done cycle is lost: the next tick re-grids that cell alone,
        # though CMR lists nothing new (its record no longer proves the chunk).
        order = load_config().output.child_order
        chunks = [int(p) for p in read_template(open_store(store), load_config()).parents]
        chunk = {
            p: Path(store) / str(order) / "h_mean" / "c" / str(chunks.index(p)) for p in touched
        }
        lost = next(p for p in sorted(touched) if chunk[p].exists())
        chunk[lost].unlink()
        [heal] = _ticks(server, env, tmp_path, parameters, 1)
        assert any("late granules in 1 cells" in m for m in server.logs([heal["id"]]))
        [repair] = [
            r
            for r in server.flow_runs(TARGET)
            if "-update-" in r["name"] and r["id"] != update["id"]
        ]
        assert list(map(int, repair["parameters"]["cells"])) == [lost]
        wanted = {k: v for k, v in repair["parameters"].items() if k in WATCHED}
        third = process_cycle(**wanted, credentials="none", granule_mirror=mirror,
                              return_state=True)  # fmt: skip
        assert third.is_completed(), third.message
        ran = {int(r.name.removeprefix("cell-")): r.state.name for r in
               cell_task_runs(third.state_details.flow_run_id)}  # fmt: skip
        assert ran == {lost: "Completed"}  # not taken from the cache
    finally:
        cmr.stop()

    expected = reference_statistics([g.path for g in granules])
    arrays = store_arrays(store)
    n = load_config().output.children_per_parent
    parents = [int(p) for p in read_template(open_store(store), load_config()).parents]
    for i, parent in enumerate(parents):
        got = arrays["count"][i * n : (i + 1) * n]
        want = expected.get(parent)
        assert (got == 0).all() if want is None else (got == want["count"]).all(), parent


WATCHED = {"cycle", "store", "region", "config", "keep_fragments", "cmr_url", "cells"}
"""The update run's parameters that say what to grid (not where: the test runs it locally)."""


def _fetched_only(store: str, name: str, summary: dict) -> bool:
    """The run's fetched bytes are the late granule's, as its extract record counted them."""
    record = read_extract_record(open_store(store), load_config(), name)
    return record is not None and record.bytes_fetched == summary["extract_bytes_fetched"]
