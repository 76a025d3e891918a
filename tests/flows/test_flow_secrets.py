"""Credentials in a run: refreshed when they near expiry, and never written anywhere.

NSIDC's S3 credentials last an hour; a cycle takes longer. Here a credential
source hands out fresh one-hour credentials on a test clock that advances 20
minutes each time a granule's extract is dispatched, and the S3 proxy in front of moto
refuses a request signed with credentials past their expiry (``ExpiredToken``,
as S3 does). A run whose extracts kept the first credentials would fail from the
third granule on; each extract must instead get credentials with at least
the refresh margin left.

Then every place Prefect keeps anything — its database (flow and task runs,
parameters, states, logs, artifacts), its result storage, the console — is
searched for every secret the runs handled, with every log line kept at
DEBUG.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import threading
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prefect import flow
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_DATABASE_CONNECTION_URL

from magg.flows.process_cycle import process_cycle
from magg.tasks.credentials import CREDENTIAL_SOURCES, open_credentials
from magg.tasks.extract import extract_locally
from magg.tasks.workers import worker_pool
from magg_core.access.credentials import DEFAULT_MARGIN, Credentials
from magg_core.access.s3 import S3Credentials
from magg_core.config import load_config
from magg_core.extract.granule import extract_granule
from magg_core.grid.plan import plan_cells, plan_extracts
from magg_core.store.arrays import create_template, open_store
from magg_core.urls import granule_name
from tests.fakes.lambda_api import FakeLambda
from tests.flow_support import (
    S3Error,
    ambient_s3,
    cell_task_runs,
    local_run_fixture,  # noqa: F401 - the shared ``local_run`` fixture
    s3_proxy,
    store_arrays,
)

OUT = "magg-secrets-out"
STEP = timedelta(minutes=20)
LIFETIME = timedelta(hours=1)
CELL, LEAKY = "magg-secrets-cell", "magg-secrets-leaky"


class SteppingClock:
    """UTC time that moves on only when the run asks it (once per dispatched extract)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self._lock = threading.Lock()

    def tick(self) -> datetime:
        with self._lock:
            self.now += STEP
            return self.now


class ShortLivedSource:
    """Fresh credentials on every fetch, valid for an hour of the clock, like NSIDC's."""

    description = "test s3credentials"

    def __init__(self, clock: SteppingClock) -> None:
        self.clock = clock
        self.issued: dict[str, S3Credentials] = {}

    def fetch(self) -> S3Credentials:
        credentials = S3Credentials(
            access_key_id=f"ASIAMAGGTEST{len(self.issued):04d}",
            secret_access_key=secrets.token_urlsafe(30),
            session_token=secrets.token_urlsafe(60),
            expiration=self.clock.now + LIFETIME,
        )
        self.issued[credentials.access_key_id] = credentials
        return credentials

    def expired(self, access_key: str | None) -> bool:
        credentials = self.issued.get(access_key or "")
        return credentials is not None and credentials.expiration <= self.clock.now


@pytest.fixture(scope="module")
def source():
    """The run's ``environment`` credentials, swapped for the short-lived source."""
    clock = SteppingClock()
    source = ShortLivedSource(clock)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(
            CREDENTIAL_SOURCES, "environment", lambda: Credentials(source, clock=clock.tick)
        )
        yield source


@pytest.fixture(scope="module")
def proxy(moto_server, source):
    def refuse_expired(method, bucket, key, access_key):
        if source.expired(access_key):
            return S3Error(400, "ExpiredToken", "The provided token has expired.")
        return None

    with s3_proxy(moto_server.url) as proxy, pytest.MonkeyPatch.context() as env:
        proxy.fault = refuse_expired
        ambient_s3(env, moto_server, endpoint=proxy.url)
        moto_server.create_bucket(OUT)
        yield proxy


@pytest.fixture(scope="module")
def logs():
    """Every log line of the module's runs, at DEBUG, to the API and to a console buffer.

    magg's own loggers go to the API as well, as they do for a user who adds
    them to ``PREFECT_LOGGING_EXTRA_LOGGERS``.
    """
    console = io.StringIO()
    echo = logging.StreamHandler(console)
    api = APILogHandler()
    prefect_logger, magg_logger = logging.getLogger("prefect"), logging.getLogger("magg_core")
    levels = prefect_logger.level, magg_logger.level
    prefect_logger.setLevel(logging.DEBUG)
    magg_logger.setLevel(logging.DEBUG)
    magg_logger.addHandler(api)
    logging.getLogger().addHandler(echo)
    try:
        yield console
    finally:
        logging.getLogger().removeHandler(echo)
        magg_logger.removeHandler(api)
        prefect_logger.setLevel(levels[0])
        magg_logger.setLevel(levels[1])


@pytest.fixture(scope="module")
def refresh_run(local_run, source, proxy, logs):
    """All granules, one at a time, so each dispatch moves the clock exactly once."""
    state = process_cycle(
        catalog=str(local_run.sample.catalog_path),
        store=f"s3://{OUT}/refresh.zarr",
        credentials="environment",
        concurrency=1,
        granule_mirror=local_run.sample.mirror,
        return_state=True,
    )
    return state


def test_credentials_that_expire_mid_run_are_refreshed_and_no_cell_fails(
    local_run, source, proxy, refresh_run
):
    assert refresh_run.is_completed(), refresh_run.message
    n_cells = len(local_run.sample.parents)
    runs = cell_task_runs(refresh_run.state_details.flow_run_id)
    assert len(runs) == n_cells and all(r.state.is_completed() and r.run_count == 1 for r in runs)

    # The run outlived its first credentials: used past their expiry, S3 refuses them.
    first, *later = source.issued
    assert source.expired(first)
    assert later, "the credentials were never refreshed"
    # Each granule's extract was handed credentials with at least the margin left, so
    # none expired in use; cells read fragments and were handed none.
    granule_reads = [c for c in proxy.calls if c.bucket == "magg-e2e-in"]
    assert {c.access_key for c in granule_reads} == set(source.issued)
    assert all(c.status in (200, 206) for c in granule_reads)
    n_granules = len({c.key for c in granule_reads})
    assert LIFETIME - DEFAULT_MARGIN < STEP * n_granules  # the test did need a refresh

    local, refreshed = store_arrays(local_run.store), store_arrays(f"s3://{OUT}/refresh.zarr")
    for name in local:
        np.testing.assert_array_equal(refreshed[name], local[name], err_msg=name)


REFUSALS = [
    ("GET", 400, "ExpiredToken", "The provided token has expired."),
    ("GET", 400, "InvalidToken", "The provided token is malformed or otherwise invalid."),
    ("GET", 400, "TokenRefreshRequired", "The provided token must be refreshed."),
    ("GET", 403, "AccessDenied", "Access Denied"),
    ("GET", 403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist."),
    # S3 refuses an expired token on a HEAD with a bare 400: no body, no code.
    ("HEAD", 400, None, ""),
    ("HEAD", 403, None, ""),
]


def _extracts_refused_once(proxy, extracts, method, error):
    """``extracts`` as one group task of the local backend, S3 refusing the first granule
    read of ``method`` with ``error``; its final state, the refused read's (key, access
    key), and every call the proxy saw meanwhile."""
    refused = []

    def refuse_once(method_, bucket, key, access_key):
        if bucket == "magg-e2e-in" and method_ == method and not refused:
            refused.append((key, access_key))
            return error
        return None

    @flow
    def one_group():
        quick = extract_locally.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
        credentials = open_credentials("environment")
        with worker_pool(1) as workers:
            return quick(extracts, credentials, workers, return_state=True)

    usual, proxy.fault = proxy.fault, refuse_once
    calls_before = len(proxy.calls)
    try:
        state = one_group()
    finally:
        proxy.fault = usual
    assert refused, "no granule read was refused"
    return state, refused[0], proxy.calls[calls_before:]


@pytest.mark.parametrize(
    ("method", "status", "code", "message"),
    REFUSALS,
    ids=[f"{r[0]}-{r[2] or r[1]}" for r in REFUSALS],
)
def test_a_read_refused_for_its_credentials_is_retried_with_fresh_ones(
    local_run, source, proxy, method, status, code, message
):
    """S3 may refuse credentials mid-extract (clock skew, early revocation, a revoked
    session): that says nothing about the granule. The extract fails for a retry that
    runs with credentials fetched anew, never leaving the granule out. (Extracts are
    the only tasks that read NSIDC's granules, so the only ones handed credentials.)"""
    store = f"s3://{OUT}/refused-{method}-{code or status}.zarr"
    config = load_config()
    create_template(open_store(store), config, local_run.sample.catalog.parents, {})
    requests = plan_cells(
        local_run.sample.catalog, config, store, granule_mirror=local_run.sample.mirror
    )
    request = max(plan_extracts(requests), key=lambda r: len(r.parents))

    state, (_, refused_with), calls = _extracts_refused_once(
        proxy, [request], method, S3Error(status, code, message)
    )

    assert state.is_completed(), state.message
    (run,) = cell_task_runs(state.state_details.flow_run_id, prefix="extract-")
    assert run.run_count == 2
    retried_with = {c.access_key for c in calls if c.bucket == "magg-e2e-in"}
    assert refused_with in retried_with and len(retried_with) == 2  # the retry's are new ones
    # Nothing of the granule was left out: the same extract, never refused, finds as much.
    unrefused = replace(request, store_path=f"{store[:-5]}-unrefused.zarr")
    create_template(open_store(unrefused.store_path), config, local_run.sample.catalog.parents, {})
    expected = extract_granule(unrefused)
    (result,) = state.result()
    assert result.status == expected.status == "ok"
    assert (result.points, result.parents) == (expected.points, expected.parents) != (0, 0)


def test_a_group_of_extracts_retries_only_the_refused_granule(local_run, source, proxy):
    """Several granules a task run (the local backend's groups): S3 refuses one granule's
    credentials; the group is retried, the refused granule read again with new ones, the
    others not read again (their extract records are in the store)."""
    store = f"s3://{OUT}/refused-group.zarr"
    config = load_config()
    create_template(open_store(store), config, local_run.sample.catalog.parents, {})
    requests = plan_cells(
        local_run.sample.catalog, config, store, granule_mirror=local_run.sample.mirror
    )
    extracts = plan_extracts(requests)
    assert len(extracts) >= 3

    state, (refused_key, refused_with), calls = _extracts_refused_once(
        proxy, extracts, "GET", S3Error(400, "ExpiredToken", "The provided token has expired.")
    )

    assert state.is_completed(), state.message
    (run,) = cell_task_runs(state.state_details.flow_run_id, prefix="extracts-")
    assert run.run_count == 2
    results = state.result()
    assert sorted(r.url for r in results) == sorted(e.granule_url for e in extracts)
    assert {r.status for r in results} == {"ok"}
    # The refused granule was read again with new credentials ...
    again = {c.access_key for c in calls if c.bucket == "magg-e2e-in" and c.key == refused_key}
    assert again - {refused_with}
    # ... and every granule's extract was done once: one extract record written each.
    records = Counter(
        c.key.split("/")[-2]
        for c in calls
        if c.bucket == OUT and c.method == "PUT" and c.succeeded and c.key.endswith("/extract.json")
    )
    assert records == {granule_name(e.granule_url): 1 for e in extracts}


@pytest.fixture(scope="module")
def lambda_runs(local_run, source, proxy, moto_server, logs):
    """Cells on Lambda, whose payloads carry the credentials, and a function that leaks them."""
    role = {
        "AWS_ENDPOINT_URL_S3": proxy.url,
        "AWS_ACCESS_KEY_ID": moto_server.credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": moto_server.credentials.secret_access_key,
        "MAGG_ALLOWED_STORES": f"s3://{OUT}/",
    }
    with FakeLambda() as fake, pytest.MonkeyPatch.context() as env:
        fake.add_function(CELL, environment=role)
        fake.add_function(LEAKY, handler="tests.deployments.test_lambda.leaky_raising_handler")
        # The ambient AWS configuration, no block: where Lambda is, in which region.
        env.setenv("AWS_ENDPOINT_URL_LAMBDA", fake.url)
        env.setenv("AWS_DEFAULT_REGION", "us-west-2")
        states = {
            function: process_cycle(
                catalog=str(local_run.sample.catalog_path),
                store=f"s3://{OUT}/{function}.zarr",
                backend="lambda",
                credentials="environment",
                concurrency=1,
                max_cells=1,
                granule_mirror=local_run.sample.mirror,
                lambda_function=function,
                return_state=True,
            )
            for function in (CELL, LEAKY)
        }
        leaked = "".join(i.output for i in fake.invocations(LEAKY))
    return states, leaked


def test_no_secret_reaches_prefect_its_storage_or_the_logs(
    refresh_run, lambda_runs, source, moto_server, logs
):
    states, leaked = lambda_runs
    assert states[CELL].is_completed(), states[CELL].message
    assert states[LEAKY].is_failed()
    # Extracts carry the credentials (cells read only fragments, and get none).
    leaky = cell_task_runs(states[LEAKY].state_details.flow_run_id, prefix="extract-")
    assert leaky and all("could not sign with ***" in r.state.message for r in leaky)
    secret_values = {moto_server.credentials.secret_access_key, "testing-invoker-secret"}
    for credentials in source.issued.values():
        secret_values |= {credentials.access_key_id, *credentials.secrets()}
    assert any(s in leaked for s in secret_values)  # the function really did leak one

    APILogHandler().flush()  # logs reach the API in batches
    database = dict(prefect_database())
    # The scan sees the runs: their parameters, and magg's log lines about credentials.
    assert any("refresh.zarr" in text for text in database.values())
    assert any("S3 credentials from test s3credentials" in text for text in database.values())
    places = database | dict(result_storage())
    places["log records"] = logs.getvalue()
    assert "S3 credentials from test s3credentials, key ASIA…" in places["log records"]
    found = {(where, s[:6]) for where, text in places.items() for s in secret_values if s in text}
    assert not found


def prefect_database():
    """The server's SQLite files, whole: every table, index and journal page."""
    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    path = Path(url.split(":///", 1)[1])
    for file in path.parent.glob(path.name + "*"):
        yield str(file), file.read_bytes().decode("utf-8", errors="replace")


def result_storage():
    """Persisted results and cache records, with their base64 payloads decoded."""
    for file in Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser().rglob("*"):
        if not file.is_file():
            continue
        raw = file.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        try:
            payload = json.loads(raw).get("result")
        except (ValueError, AttributeError):
            payload = None
        if isinstance(payload, str):
            text += base64.b64decode(payload).decode("utf-8", errors="replace")
        yield str(file), text
