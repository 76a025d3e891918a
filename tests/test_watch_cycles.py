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

import pytest

from magg_core.catalog import catalog_from_records
from magg_core.cell import process_cell
from magg_core.config import load_config
from magg_core.cycles import cycle_query_range, cycle_range
from magg_core.plan import cycle_store, plan_cells
from magg_core.sample import write_sample
from magg_core.store import create_template, open_store
from tasks.watch import due_cycles
from tests.deploy_support import ALL_DEPLOYMENTS, BIN, PrefectServer, prefect_cli
from tests.fakes.cmr import FakeCmr

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


def _granules(directory, cycle):
    granules = write_sample(
        directory, n_granules=1, extent_km=20, centre=(-78.0, 40.0), seed=3, cycle=cycle
    )
    return granules, catalog_from_records([g.umm for g in granules], cycle=cycle)


def _grid(store_url, catalog, mirror):
    """Grid a whole cycle with magg_core, as a finished ``process-cycle`` run leaves it."""
    config = load_config()
    create_template(open_store(store_url), config, catalog.parents, {})
    for request in plan_cells(catalog, config, store_url, granule_mirror=str(mirror)):
        assert process_cell(request).status == "ok"


def test_two_overlapping_ticks_start_one_run_for_a_newly_published_cycle(registered, tmp_path):
    server, env = registered
    now = datetime.now(UTC)
    newest = max(c for c in range(1, 100) if cycle_range(c).end + LATENCY <= now)
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

    def ticks(n: int) -> list[dict]:
        """``n`` scheduled ticks, executed at the same time as a worker would."""
        runs = [server.create_run("watch-cycles/antarctica", parameters) for _ in range(n)]
        processes = [
            subprocess.Popen(
                [str(BIN / "prefect"), "flow-run", "execute", run["id"]],
                env=env,
                cwd=tmp_path,
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

    try:
        [first] = ticks(1)
        assert server.flow_runs(TARGET) == []  # the newest cycle is not in CMR yet
        assert any(f"cycle {previous}: done" in m for m in server.logs([first["id"]]))
        newest_range = ",".join(cycle_query_range(newest).isoformat())
        asked = cmr.search_requests(with_results=False)
        queried = {dict(r.params).get("temporal[]") for r in asked}
        assert queried == {newest_range}  # the finished cycle cost no CMR query

        cmr.items.extend(g.umm for g in new)  # CMR publishes the new cycle
        overlapping = ticks(2)
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
        "cmr_url": cmr.url,
    }
    for tick in overlapping:
        assert any(run["id"] in m for m in server.logs([tick["id"]])), "each tick names the run"
    assert server.flow_runs("process-cycle/lambda") == []
