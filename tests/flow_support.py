"""Shared parts of the flow tests: the sample in moto S3, an S3 fault proxy, Prefect look-ups.

The proxy sits between every S3 client of a run (the flow's threads, the
Lambda sandboxes) and moto, forwarding requests unchanged. It records who
asked for what (method, key, signing access key, answer), so tests can count
chunk writes, and it can answer with S3's own errors for the requests a test
chooses (an injected fault that is cleared later, credentials that have
expired on a test clock) or stall them (a fault that sleeps, then passes).
"""

from __future__ import annotations

import gc
import http.client
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

import numpy as np
import pytest
import zarr

from magg_core.catalog.catalog import Catalog, catalog_from_records
from magg_core.config import PipelineConfig, load_config
from magg_core.granules.sample import write_sample
from magg_core.store.arrays import open_store
from magg_core.store.records import read_records
from tests.fakes.loopback import serve_on_loopback, shut_down
from tests.oracle import STATISTICS, reference_statistics

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Artifact, TaskRun

    from tests.conftest import MotoS3

CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}
SAMPLE_CYCLE = 22
SAMPLE = {"n_granules": 3, "extent_km": 200.0, "spacing_m": 100.0}
"""The flow tests' sample: 6 parent cells of 1–2 granules each, small enough that a
run through moto takes seconds."""


# -- the S3 proxy ------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Call:
    """One request the proxy saw and what it answered."""

    method: str
    bucket: str
    key: str
    access_key: str | None
    status: int

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class S3Error:
    """An answer in S3's error format."""

    status: int
    code: str | None
    """``None``: a bare status, as S3 answers a ``HEAD`` (which has no body)."""
    message: str

    def body(self) -> bytes:
        if self.code is None:
            return b""
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code>'
            f"<Message>{self.message}</Message></Error>"
        ).encode()


Fault = Callable[[str, str, str, "str | None"], "S3Error | None"]
"""``fault(method, bucket, key, access_key)``: an error to answer instead, or ``None``."""
Cut = Callable[[str, str, str], bool]
"""``cut(method, bucket, key)``: answer with only the first half of the body upstream sent
(its ``Content-Length`` saying so, its ``Content-Range`` unchanged): a short read."""


@dataclass
class S3Proxy:
    """A loopback S3 endpoint in front of moto that records and can refuse requests."""

    upstream: str
    fault: Fault | None = None
    cut: Cut | None = None
    calls: list[S3Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> S3Proxy:
        proxy = self
        target = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urlsplit(self.path).path
                bucket, _, key = unquote(path).lstrip("/").partition("/")
                found = CREDENTIAL.search(self.headers.get("Authorization", ""))
                access_key = found.group(1) if found else None
                fault = proxy.fault
                error = fault(self.command, bucket, key, access_key) if fault else None
                if error is not None:
                    status, headers = error.status, {"Content-Type": "application/xml"}
                    payload = error.body()
                else:
                    status, headers, payload = self._upstream(body)
                    if proxy.cut is not None and proxy.cut(self.command, bucket, key):
                        payload = payload[: len(payload) // 2]
                with proxy._lock:
                    proxy.calls.append(S3Call(self.command, bucket, key, access_key, status))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if self.command != "HEAD" or "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _upstream(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    kept = {
                        k: v
                        for k, v in response.getheaders()
                        if k.lower() not in HOP_BY_HOP
                        or (self.command == "HEAD" and k.lower() == "content-length")
                    }
                    return response.status, kept, payload
                finally:
                    connection.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = serve_on_loopback(Handler)
        return self

    def stop(self) -> None:
        shut_down(self._server)

    def mark(self) -> int:
        """A position in the call log; :meth:`since` returns what came after it."""
        with self._lock:
            return len(self.calls)

    def since(self, mark: int) -> list[S3Call]:
        with self._lock:
            return self.calls[mark:]


@contextmanager
def s3_proxy(upstream: str) -> Iterator[S3Proxy]:
    """An :class:`S3Proxy` in front of ``upstream`` while the block runs.

    The proxy is a thread of the test process (its faults are the test's own
    callables), so the cyclic garbage collector is paused meanwhile: a
    collection run on the proxy's thread could free an h5py object, which
    waits for h5py's global lock while a reader holding it waits for the
    proxy (see ``tests.conftest.running_moto``).
    """
    collecting = gc.isenabled()
    gc.disable()
    proxy = S3Proxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.stop()
        if collecting:
            gc.enable()


# -- the sample, in S3, with its oracle ---------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """Sample granules uploaded to a moto bucket, their catalog and the oracle's statistics."""

    catalog: Catalog
    catalog_path: Path
    mirror: str
    """``s3://bucket/prefix`` holding the granules (the flow's ``granule_mirror``)."""
    oracle: dict[int, dict[str, np.ndarray]]

    @property
    def parents(self) -> list[int]:
        return [int(p) for p in self.catalog.parents]


def sample_in_s3(s3: MotoS3, directory: Path, bucket: str, **sample: Any) -> Sample:
    """Write the sample (``write_sample``'s options), upload it, catalog it, run the oracle."""
    granules = write_sample(directory / "granules", **sample)
    s3.create_bucket(bucket)
    s3.upload_dir(directory / "granules", bucket, "ATL06")
    catalog = catalog_from_records([g.umm for g in granules], cycle=SAMPLE_CYCLE)
    return Sample(
        catalog=catalog,
        catalog_path=catalog.write(directory / "catalog.json"),
        mirror=f"s3://{bucket}/ATL06",
        oracle=reference_statistics([g.path for g in granules]),
    )


def store_arrays(url: str, config: PipelineConfig | None = None) -> dict[str, np.ndarray]:
    """Every array of the store's child-order group, read whole (ambient S3 settings)."""
    config = config or load_config()
    group = zarr.open_group(
        open_store(url, read_only=True), path=str(config.output.child_order), mode="r"
    )
    return {name: array[:] for name, array in group.arrays()}


def assert_store_matches_oracle(url: str, sample: Sample) -> None:
    """Each parent's chunk equals the oracle's statistics (fill values where it has none)."""
    config = load_config()
    arrays = store_arrays(url, config)
    n = config.output.children_per_parent
    for i, parent in enumerate(sample.parents):
        cells = slice(i * n, (i + 1) * n)
        expected = sample.oracle.get(parent)
        for name in STATISTICS:
            got = arrays[name][cells]
            if expected is None:
                empty = got == 0 if name == "count" else np.isnan(got)
                assert empty.all(), f"{name} of parent {parent} should be empty"
                continue
            want = expected[name].astype(got.dtype) if name == "count" else expected[name]
            np.testing.assert_allclose(
                got, want, rtol=2e-6, equal_nan=True, err_msg=f"{name} of parent {parent}"
            )


def records_by_parent(url: str) -> dict[int, Any]:
    config = load_config()
    return read_records(open_store(url, read_only=True), config)


def chunk_writes(proxy: S3Proxy, store_path: str, mark: int = 0) -> dict[tuple[str, int], int]:
    """Successful writes (PUT, or DELETE of an all-fill chunk) per (statistic, chunk index)."""
    bucket, _, prefix = store_path.removeprefix("s3://").partition("/")
    counts: dict[tuple[str, int], int] = {}
    for call in proxy.since(mark):
        if call.bucket != bucket or call.method not in ("PUT", "DELETE") or not call.succeeded:
            continue
        parts = call.key.removeprefix(f"{prefix}/12/").split("/")
        if call.key.startswith(f"{prefix}/12/") and len(parts) == 3 and parts[1] == "c":
            if parts[0] in STATISTICS:
                key = (parts[0], int(parts[2]))
                counts[key] = counts.get(key, 0) + 1
    return counts


def record_writes(proxy: S3Proxy, store_path: str, mark: int = 0) -> dict[int, int]:
    """Successful writes of per-cell records, by parent morton word."""
    bucket, _, prefix = store_path.removeprefix("s3://").partition("/")
    counts: dict[int, int] = {}
    for call in proxy.since(mark):
        name = call.key.removeprefix(f"{prefix}/records/12/")
        if (
            call.bucket == bucket
            and call.method == "PUT"
            and call.succeeded
            and call.key.startswith(f"{prefix}/records/12/")
        ):
            parent = int(name.removesuffix(".json"))
            counts[parent] = counts.get(parent, 0) + 1
    return counts


# -- one local run of the sample, shared by the test modules that compare with it ------------


@dataclass(frozen=True)
class LocalRun:
    """The sample in S3, gridded by ``process-cycle`` on the local backend."""

    sample: Sample
    store: str
    flow_run_id: UUID
    summary: dict[str, Any]


_local_runs: dict[str, LocalRun] = {}


@pytest.fixture(scope="session", name="local_run")
def local_run_fixture(moto_server, prefect_server, tmp_path_factory) -> LocalRun:
    """Run once per session, however many modules import this fixture."""
    if "run" not in _local_runs:
        from magg.flows.process_cycle import process_cycle

        sample = sample_in_s3(
            moto_server, tmp_path_factory.mktemp("local-run"), "magg-e2e-in", **SAMPLE
        )
        moto_server.create_bucket("magg-e2e-out")
        store = "s3://magg-e2e-out/local.zarr"
        with pytest.MonkeyPatch.context() as env:
            ambient_s3(env, moto_server)
            state = process_cycle(
                catalog=str(sample.catalog_path),
                store=store,
                credentials="environment",
                granule_mirror=sample.mirror,
                return_state=True,
            )
        assert state.is_completed(), state.message
        _local_runs["run"] = LocalRun(
            sample=sample,
            store=store,
            flow_run_id=state.state_details.flow_run_id,
            summary=state.result(),
        )
    return _local_runs["run"]


def ambient_s3(env: pytest.MonkeyPatch, s3: MotoS3, endpoint: str | None = None) -> None:
    """What the ``s3_env`` fixture sets, for fixtures wider than one test."""
    env.setenv("AWS_ENDPOINT_URL_S3", endpoint or s3.url)
    env.setenv("AWS_REGION", s3.endpoint.region)
    env.setenv("AWS_ACCESS_KEY_ID", s3.credentials.access_key_id)
    env.setenv("AWS_SECRET_ACCESS_KEY", s3.credentials.secret_access_key)
    env.delenv("AWS_SESSION_TOKEN", raising=False)


# -- Prefect look-ups ----------------------------------------------------------------------


def cell_task_runs(
    flow_run_id: UUID, flow_run_count: int | None = None, prefix: str = "cell-"
) -> list[TaskRun]:
    """The per-cell task runs of a flow run (of one of its attempts, if given).

    ``prefix="extract-"`` gives its per-granule extract task runs instead.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [
        r
        for r in runs
        if r.name.startswith(prefix)
        and (flow_run_count is None or r.flow_run_run_count == flow_run_count)
    ]


def flow_run_artifacts(flow_run_id: UUID) -> dict[str, Artifact]:
    """The flow run's artifacts by key (the latest of each)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in sorted(artifacts, key=lambda a: a.created) if a.key}


def retry_like_the_ui(flow: Any, flow_run_id: UUID) -> Any:
    """Do what the UI's Retry button does, then run the same flow run here, as a worker would.

    The button sets the run ``AwaitingRetry`` (a ``SCHEDULED`` state), forced
    past the orchestration rules (docs/architecture.md §Prefect); a worker then executes that same
    flow run with its stored parameters. Returns the run's final state.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.flow_engine import run_flow
    from prefect.states import State

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            flow_run_id, State(type=StateType.SCHEDULED, name="AwaitingRetry"), force=True
        )
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state is not None and flow_run.state.name == "AwaitingRetry"
    return run_flow(flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")


def read_flow_run(flow_run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)
