"""``process-cycle`` on the Lambda backend: the same store as the local backend, one
invocation per cell however slow, and retries only where they can help.

The function is the real handler, run per invocation in a fresh process by
the loopback fake of the Invoke API; the flow reaches it through a prefect-aws
``AwsCredentials`` block, as a user configures it. Time is scaled down: the
block asks for a 1 s read timeout and botocore retries (what a user might
well set, and what prefect-aws would apply), and every invocation takes 1.5 s
— standing in for botocore's 60 s default and a > 60 s cell.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect_aws import AwsClientParameters, AwsCredentials

from deployments.aws.lambda_client import invoke_cell
from magg.flows.process_cycle import process_cycle
from magg.tasks.cells import LAMBDA_CONCURRENCY_LIMIT, grid_cell_on_lambda
from magg.tasks.lambda_backend import DEFAULT_LAMBDA_CONCURRENCY, lambda_client, lambda_concurrency
from magg_core.config import load_config
from magg_core.grid.plan import plan_cells
from magg_core.morton import point_morton
from magg_core.schema import CellRequest
from magg_core.store.arrays import create_template, open_store, read_template
from tests.fakes.lambda_api import FakeLambda
from tests.flow_support import (
    ambient_s3,
    assert_store_matches_oracle,
    cell_task_runs,
    flow_run_artifacts,
    local_run_fixture,  # noqa: F401 - the shared ``local_run`` fixture
    records_by_parent,
    store_arrays,
)

OUT = "magg-lambda-flow-out"
CELL = "magg-flow-cell"
THROTTLED = "magg-flow-throttled"
TIMES_OUT = "magg-flow-times-out"
BLOCK = "magg-test-lambda-invoker"
SHORT_READ_TIMEOUT_S = 1
SLOW_S = 1.5
"""Every invocation of CELL takes this long: longer than the block's read timeout."""
CONCURRENCY = 4


@pytest.fixture(scope="module")
def fake(moto_server):
    role = {  # the function's own S3 access (its execution role), pointed at moto
        "AWS_ENDPOINT_URL_S3": moto_server.url,
        "AWS_ACCESS_KEY_ID": moto_server.credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": moto_server.credentials.secret_access_key,
        "MAGG_ALLOWED_STORES": f"s3://{OUT}/",  # set by the deploy script
    }
    with FakeLambda() as fake:
        fake.add_function(CELL, timeout_s=60, environment=role, delay_s=SLOW_S)
        fake.add_function(THROTTLED, timeout_s=60, environment=role)
        fake.add_function(TIMES_OUT, timeout_s=1, environment=role, delay_s=10)
        yield fake


@pytest.fixture(scope="module")
def block(fake, prefect_server) -> str:
    AwsCredentials(
        aws_access_key_id="testing-invoker",
        aws_secret_access_key="testing-invoker-secret",
        region_name="us-west-2",
        aws_client_parameters=AwsClientParameters(
            endpoint_url=fake.url,
            config={
                "read_timeout": SHORT_READ_TIMEOUT_S,
                "retries": {"mode": "legacy", "max_attempts": 4},
            },
        ),
    ).save(BLOCK, overwrite=True)
    return BLOCK


@pytest.fixture(scope="module")
def bucket(moto_server) -> str:
    return moto_server.create_bucket(OUT)


@pytest.fixture(scope="module")
def lambda_run(local_run, fake, block, moto_server, bucket):
    store = f"s3://{OUT}/lambda.zarr"
    with pytest.MonkeyPatch.context() as env:
        ambient_s3(env, moto_server)
        state = process_cycle(
            catalog=str(local_run.sample.catalog_path),
            store=store,
            backend="lambda",
            credentials="environment",
            concurrency=CONCURRENCY,
            granule_mirror=local_run.sample.mirror,
            lambda_function=CELL,
            aws_credentials_block=block,
            return_state=True,
        )
    assert state.is_completed(), state.message
    return store, state


def test_lambda_and_local_backends_write_identical_stores_equal_to_the_oracle(
    local_run, lambda_run, s3_env
):
    store, _ = lambda_run
    local, remote = store_arrays(local_run.store), store_arrays(store)
    assert set(remote) == set(local)
    for name in local:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)
    assert_store_matches_oracle(store, local_run.sample)

    def outcome(record):
        data = record.result.to_dict()
        del data["duration_s"], data["peak_rss_mb"]
        return data

    local_records, remote_records = records_by_parent(local_run.store), records_by_parent(store)
    assert {p: outcome(r) for p, r in remote_records.items()} == {
        p: outcome(r) for p, r in local_records.items()
    }
    assert {r.fingerprint for r in remote_records.values()} == {
        r.fingerprint for r in local_records.values()
    }


def test_each_cell_is_invoked_exactly_once_though_slower_than_the_blocks_read_timeout(
    local_run, lambda_run, fake
):
    """One extract invocation per granule, then one cell invocation per cell; none twice."""
    _, state = lambda_run
    n_cells = len(local_run.sample.parents)
    n_granules = len({g.name for gs in local_run.sample.catalog.cells.values() for g in gs})
    invocations = fake.invocations(CELL)
    assert fake.received(CELL) == n_granules + n_cells == len(invocations)
    assert all(
        i.outcome == "ok" and i.duration_s >= SLOW_S > SHORT_READ_TIMEOUT_S for i in invocations
    )

    runs = cell_task_runs(state.state_details.flow_run_id)
    assert len(runs) == n_cells and all(r.state.is_completed() and r.run_count == 1 for r in runs)
    rows = json.loads(flow_run_artifacts(state.state_details.flow_run_id)["magg-cells"].data)
    assert all(row["seconds"] > 0 for row in rows) and len(rows) == n_cells

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(LAMBDA_CONCURRENCY_LIMIT)
    assert limit.limit == CONCURRENCY and limit.active_slots == 0


@pytest.fixture(scope="module")
def one_cell(local_run, block, moto_server, bucket):
    """Run an empty cell through the real Lambda task, without backoff between attempts.

    Each call takes another cell: a cell's result is cached whichever function
    computed it (the output does not depend on where it ran).
    """
    store = f"s3://{OUT}/classify.zarr"
    config = load_config()
    parents = local_run.sample.catalog.parents
    with pytest.MonkeyPatch.context() as env:
        ambient_s3(env, moto_server)
        create_template(open_store(store), config, parents, {})
        store_id = read_template(open_store(store), config).id
    requests = iter(plan_cells(local_run.sample.catalog, config, store))
    client = lambda_client(block, 60, 1)
    lambda_concurrency(CONCURRENCY)

    @flow
    def run_one(request, function: str):
        quick = grid_cell_on_lambda.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
        return quick(request, store_id, client, function)

    def run(function: str):
        state = run_one(replace(next(requests), granule_urls=()), function, return_state=True)
        (task_run,) = cell_task_runs(state.state_details.flow_run_id)
        return state, task_run

    return run


def test_a_throttled_invocation_is_retried_by_prefect_not_by_botocore(one_cell, fake):
    fake.function(THROTTLED).throttle_next = 1

    state, task_run = one_cell(THROTTLED)

    assert state.is_completed() and state.result().status == "no_granules"
    assert task_run.run_count == 2
    assert [i.outcome for i in fake.invocations(THROTTLED)] == ["throttled", "ok"]


def test_a_function_timeout_fails_the_cell_without_a_retry(one_cell, fake):
    state, task_run = one_cell(TIMES_OUT)

    assert state.is_failed() and "Sandbox.Timedout" in state.message
    assert task_run.run_count == 1
    assert fake.received(TIMES_OUT) == 1


def test_the_concurrency_limit_is_created_once_then_left_to_the_operator(prefect_server):
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(LAMBDA_CONCURRENCY_LIMIT)
        assert lambda_concurrency(None) == DEFAULT_LAMBDA_CONCURRENCY
        client.upsert_global_concurrency_limit_by_name(LAMBDA_CONCURRENCY_LIMIT, 7)  # the UI
        assert lambda_concurrency(None) == 7
        assert lambda_concurrency(3) == 3
        limit = client.read_global_concurrency_limit_by_name(LAMBDA_CONCURRENCY_LIMIT)
    assert limit.limit == 3


@pytest.fixture
def only_aws_region(fake, monkeypatch, tmp_path):
    """The ambient AWS configuration of a container: keys and ``AWS_REGION``, nothing else."""
    for name in ("AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-invoker")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-invoker-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", fake.url)
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    return monkeypatch


def test_the_lambda_client_takes_the_region_from_aws_region_alone(
    only_aws_region, fake, moto_server, bucket
):
    store = f"s3://{OUT}/region.zarr"
    parent = int(point_morton(np.array([-75.0]), np.array([123.0]), 6)[0])
    with pytest.MonkeyPatch.context() as env:
        ambient_s3(env, moto_server)
        create_template(open_store(store), load_config(), [parent], {})
    request = CellRequest(parent, 6, 12, (), store, chunk_idx=0)

    client = lambda_client(None, 60, 1)

    assert client.meta.region_name == "eu-north-1"
    assert invoke_cell(client, THROTTLED, request).status == "no_granules"
    assert fake.invocations(THROTTLED)[-1].outcome == "ok"


def test_aws_region_is_overridden_by_the_blocks_region(only_aws_region, block):
    assert lambda_client(block, 60, 1).meta.region_name == "us-west-2"


def test_no_region_anywhere_is_a_clear_error(only_aws_region):
    only_aws_region.delenv("AWS_REGION")
    with pytest.raises(ValueError, match="no AWS region for invoking Lambda: set AWS_REGION"):
        lambda_client(None, 60, 1)
