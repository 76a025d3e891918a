"""The Lambda backend end to end: real boto3 client → loopback Invoke API → real handler.

Every invocation runs ``deployments.aws.lambda_handler`` in a fresh Python
process against moto S3, through the same botocore code path as production
(only ``endpoint_url`` differs); like the Lambda layer, the sandbox cannot
import Prefect. Timeouts are scaled down: a 1 s client read
timeout stands in for botocore's 60 s default, a 2.5 s function for a >60 s
cell; the property proven is the same.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import boto3
import h5py
import numpy as np
import pytest
import zarr
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from deployments.aws.lambda_client import (
    LambdaCellError,
    LambdaCellFailed,
    LambdaFunctionError,
    LambdaInvokeError,
    LambdaRequestRejected,
    LambdaThrottled,
    LambdaTimeout,
    LambdaUnexpectedResponse,
    invoke_cell,
    invoke_extract,
    is_retryable,
    lambda_client_config,
)
from deployments.aws.lambda_handler import lambda_handler
from magg_core.config import PipelineConfig, load_config
from magg_core.errors import CredentialsRejectedError, PermanentError, is_transient
from magg_core.extract.granule import extract_granule
from magg_core.granules.sample import BEAMS, write_sample
from magg_core.grid.cell import process_cell
from magg_core.morton import point_morton
from magg_core.schema import CellRequest, CellResult, ExtractRequest
from magg_core.store.arrays import create_template, open_store
from magg_core.store.fragments import fragment_key
from tests.fakes.lambda_api import REPO_ROOT, FakeLambda

if TYPE_CHECKING:  # the sandbox imports this module for its test handlers: keep it light
    from tests.conftest import MotoS3

CELL = "magg-cell"
SLOW = "magg-cell-slow"
TIMES_OUT = "magg-cell-times-out"
THROTTLED = "magg-cell-throttled"
S3_DENIED = "magg-cell-s3-denied"
LEAKY = "magg-leaky-raiser"
CRASHES = "magg-crasher"
WRONG_SHAPE = "magg-wrong-shape"
NO_ALLOW_LIST = "magg-cell-no-allow-list"
BARE_500 = "magg-bare-500"
RAISES = "magg-raises-{}"
"""Functions whose cell raises one error of each branch (:func:`raising_cell_handler`)."""

ALLOWED = "s3://magg-lambda-out/allowed"
"""The functions' ``MAGG_ALLOWED_STORES``: no trailing slash, so a prefix check on
strings (rather than path segments) would wrongly allow ``.../allowed-not/``."""

FUNCTION_TIMEOUT_S = 60
SLOW_DELAY_S = 2.5
WOULD_BE_READ_TIMEOUT_S = 1
"""Scaled-down botocore default (60 s): shorter than the slow function runs."""


# -- handlers deployed to the fake next to the real one -------------------------------


def leaky_raising_handler(event, context):
    """A careless function whose unhandled error message embeds the secret key."""
    raise RuntimeError(f"could not sign with {event['s3_credentials']['secretAccessKey']}")


def raising_cell_handler(event, context):
    """The real handler, whose cell fails with the error ``MAGG_TEST_RAISES`` names."""
    from deployments.aws import lambda_handler as handler
    from magg_core.config import ConfigError
    from magg_core.errors import CredentialsRejectedError, TransientReadError
    from magg_core.granules.h5chunks import CorruptFileError

    raised = {
        "input": ConfigError("no such column: h_lj"),
        "transient": TransientReadError("SlowDown, S3 kept throttling"),
        "credentials": CredentialsRejectedError("ExpiredToken"),
        "permanent": CorruptFileError("/gt1l/land_ice_segments/h_li: a chunk does not inflate"),
    }[os.environ["MAGG_TEST_RAISES"]]

    def cell(_event):
        raise raised

    handler._cell = cell  # fault injection: the failure is given, its answer is real
    return handler.lambda_handler(event, context)


def bare_500_handler(event, context):
    """A handler older than ``error_kind``: its 500 names no branch."""
    return {"statusCode": 500, "body": json.dumps({"error": "OSError: disk full"})}


def crashing_handler(event, context):
    """A function killed without a word, as the out-of-memory killer does."""
    os._exit(137)


def wrong_shape_handler(event, context):
    """Some other function deployed under the name the flow invokes."""
    return {"hello": "world"}


# -- fixtures -------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Sample granules in moto S3 and two identical store templates over two parents."""

    s3: MotoS3
    config: PipelineConfig
    granule_urls: tuple[str, ...]
    parents: tuple[int, ...]
    """Ascending; ``data_parent`` is the one most sample points fall in."""
    data_parent: int
    spare_parent: int
    lambda_store: str
    local_store: str
    local_granules: tuple[str, ...]
    """The same granules as local files: readable, were a handler to accept a path."""
    foreign_stores: dict[str, str]
    """Stores with this world's template that the allow-list must refuse: the
    URL an event names → the store it really is."""

    def request(self, store: str, parent: int | None = None, **changes) -> CellRequest:
        parent = self.data_parent if parent is None else parent
        request = CellRequest(
            parent_morton=parent,
            parent_order=6,
            child_order=12,
            granule_urls=self.granule_urls,
            store_path=store,
            chunk_idx=self.parents.index(parent),
            s3_credentials=self.s3.credentials,
        )
        return replace(request, **changes)

    def empty_request(self) -> CellRequest:
        """The spare parent with no granules: a quick, valid cell ('no_granules')."""
        return self.request(self.lambda_store, parent=self.spare_parent, granule_urls=())

    @property
    def secrets(self) -> tuple[str, ...]:
        credentials = self.s3.credentials
        return (credentials.access_key_id, *credentials.secrets())


@pytest.fixture(scope="module")
def world(moto_server, tmp_path_factory) -> World:
    granule_dir = tmp_path_factory.mktemp("lambda-granules")
    granules = write_sample(granule_dir, n_granules=2, extent_km=120.0, seed=7)
    moto_server.create_bucket("magg-lambda-in")
    moto_server.create_bucket("magg-lambda-out")
    moto_server.create_bucket("magg-lambda-out-evil")
    urls = moto_server.upload_dir(granule_dir, "magg-lambda-in", "ATLAS/ATL06/007")

    words = []
    for granule in granules:
        with h5py.File(granule.path) as f:
            for beam in BEAMS:
                if beam in f:
                    segments = f[f"{beam}/land_ice_segments"]
                    words.append(point_morton(segments["latitude"][:], segments["longitude"][:], 6))
    parents, counts = np.unique(np.concatenate(words), return_counts=True)
    ranked = parents[np.argsort(counts)[::-1]]
    data_parent, spare_parent = int(ranked[0]), int(ranked[1])

    config = load_config()
    stores = {
        "lambda": f"{ALLOWED}/lambda.zarr",
        "local": "s3://magg-lambda-out/local.zarr",
        "sibling": "s3://magg-lambda-out/allowed-not/cell.zarr",
        "other bucket": "s3://magg-lambda-out-evil/allowed/cell.zarr",
    }
    for url in stores.values():
        store = open_store(url, credentials=moto_server.credentials, endpoint=moto_server.endpoint)
        create_template(store, config, sorted((data_parent, spare_parent)), {"test": "lambda"})
    return World(
        s3=moto_server,
        config=config,
        granule_urls=tuple(urls),
        parents=tuple(sorted((data_parent, spare_parent))),
        data_parent=data_parent,
        spare_parent=spare_parent,
        lambda_store=stores["lambda"],
        local_store=stores["local"],
        local_granules=tuple(str(g.path) for g in granules),
        foreign_stores={
            stores["sibling"]: stores["sibling"],
            stores["other bucket"]: stores["other bucket"],
            f"{ALLOWED}/../local.zarr": stores["local"],
            "S3://magg-lambda-out/allowed/./../local.zarr/": stores["local"],
        },
    )


@pytest.fixture(scope="module")
def denying_s3():
    """An S3 endpoint that answers every request 403 AccessDenied, as S3 does."""

    class Deny(BaseHTTPRequestHandler):
        def _deny(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>"
            )
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

        def log_message(self, format, *args):  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def no_prefect(tmp_path_factory) -> str:
    """A path entry where ``import prefect`` fails, as in the Lambda layer (no Prefect)."""
    root = tmp_path_factory.mktemp("lambda-layer")
    (root / "prefect").mkdir()
    (root / "prefect" / "__init__.py").write_text(
        'raise ImportError("prefect is not in the Lambda layer")\n'
    )
    return str(root)


@pytest.fixture(scope="module")
def fake(world, denying_s3, no_prefect):
    # The function's own environment: its role's credentials and where S3 is,
    # as a Lambda configured for a non-AWS endpoint would have them.
    env = {
        "PYTHONPATH": os.pathsep.join((no_prefect, str(REPO_ROOT))),
        "AWS_ENDPOINT_URL_S3": world.s3.url,
        "AWS_ACCESS_KEY_ID": world.s3.credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": world.s3.credentials.secret_access_key,
        "MAGG_ALLOWED_STORES": ALLOWED,
    }
    with FakeLambda() as fake:
        fake.add_function(CELL, timeout_s=FUNCTION_TIMEOUT_S, environment=env)
        no_allow_list = {k: v for k, v in env.items() if k != "MAGG_ALLOWED_STORES"}
        fake.add_function(NO_ALLOW_LIST, timeout_s=FUNCTION_TIMEOUT_S, environment=no_allow_list)
        fake.add_function(SLOW, timeout_s=FUNCTION_TIMEOUT_S, environment=env, delay_s=SLOW_DELAY_S)
        fake.add_function(TIMES_OUT, timeout_s=2, environment=env, delay_s=30)
        fake.add_function(THROTTLED, timeout_s=FUNCTION_TIMEOUT_S, environment=env)
        denied_env = {**env, "AWS_ENDPOINT_URL_S3": denying_s3}
        fake.add_function(S3_DENIED, timeout_s=FUNCTION_TIMEOUT_S, environment=denied_env)
        fake.add_function(LEAKY, handler="tests.deployments.test_lambda.leaky_raising_handler")
        fake.add_function(CRASHES, handler="tests.deployments.test_lambda.crashing_handler")
        fake.add_function(WRONG_SHAPE, handler="tests.deployments.test_lambda.wrong_shape_handler")
        fake.add_function(BARE_500, handler="tests.deployments.test_lambda.bare_500_handler")
        for kind in ("input", "transient", "credentials", "permanent"):
            fake.add_function(
                RAISES.format(kind),
                handler="tests.deployments.test_lambda.raising_cell_handler",
                environment={"MAGG_TEST_RAISES": kind},
            )
        yield fake


def lambda_client(url: str, config: Config):
    return boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-west-2",
        aws_access_key_id="testing-invoker",
        aws_secret_access_key="testing-invoker-secret",
        config=config,
    )


@pytest.fixture(scope="module")
def client(fake):
    return lambda_client(fake.url, lambda_client_config(FUNCTION_TIMEOUT_S))


def assert_no_secrets(world: World, *texts: str) -> None:
    for text in texts:
        for secret in world.secrets:
            assert secret not in text


def handler_log(fake: FakeLambda, name: str) -> dict:
    """The handler's one structured line of the latest invocation of ``name``."""
    invocation = fake.invocations(name)[-1]
    lines = [json.loads(line) for line in invocation.output.splitlines() if line.startswith("{")]
    assert len(lines) == 1, invocation.output
    assert lines[0]["request_id"] == invocation.request_id
    return lines[0]


# -- the happy path -------------------------------------------------------------------


def _comparable(result: CellResult) -> dict:
    data = result.to_dict()
    del data["duration_s"], data["peak_rss_mb"]
    return data


def _chunk(world: World, url: str, name: str) -> np.ndarray:
    store = open_store(
        url, credentials=world.s3.credentials, endpoint=world.s3.endpoint, read_only=True
    )
    group = zarr.open_group(store, path="12", mode="r")
    n = world.config.output.children_per_parent
    i = world.parents.index(world.data_parent)
    return group[name][i * n : (i + 1) * n]


def test_cell_on_lambda_matches_the_same_cell_in_process(world, fake, client, s3_env):
    remote = invoke_cell(client, CELL, world.request(world.lambda_store))
    local = process_cell(world.request(world.local_store), endpoint=world.s3.endpoint)

    assert remote.status == "ok" and remote.total_obs > 0 and remote.files_processed == 2
    assert _comparable(remote) == _comparable(local)
    assert remote.duration_s.total > 0
    names = [s.name for s in world.config.aggregation.statistics] + ["cell_ids", "morton"]
    for name in names:
        np.testing.assert_array_equal(
            _chunk(world, world.lambda_store, name), _chunk(world, world.local_store, name)
        )
    assert int(_chunk(world, world.lambda_store, "count").sum()) == remote.total_obs
    assert fake.received(CELL) == 1

    line = handler_log(fake, CELL)
    assert line["statusCode"] == 200 and line["status"] == "ok"
    assert line["parent_morton"] == str(world.data_parent)
    assert line["total_obs"] == remote.total_obs and line["granule_count"] == 2
    assert set(line["duration_s"]) == {"read", "aggregate", "write", "total"}
    assert_no_secrets(world, fake.invocations(CELL)[-1].output, json.dumps(remote.to_dict()))


def _object(world: World, store: str, key: str) -> bytes:
    bucket, _, prefix = store.removeprefix("s3://").partition("/")
    return world.s3.client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()


def _extract_request(world: World, store: str, url: str | None = None) -> ExtractRequest:
    return ExtractRequest(
        granule_url=url or world.granule_urls[0],
        parents=world.parents,
        store_path=store,
        parent_order=6,
        child_order=12,
        s3_credentials=world.s3.credentials,
    )


def test_an_extract_on_lambda_stores_what_it_stores_in_process(world, fake, client, s3_env):
    """The second event kind: one granule into a fragment per parent, as in process."""
    remote = invoke_extract(client, CELL, _extract_request(world, world.lambda_store))
    local = extract_granule(_extract_request(world, world.local_store), endpoint=world.s3.endpoint)

    assert remote.status == local.status == "ok" and remote.points == local.points > 0
    assert remote.parents == len(world.parents)
    for parent in world.parents:
        key = fragment_key(world.config, world.granule_urls[0], parent)
        assert _object(world, world.lambda_store, key) == _object(world, world.local_store, key)
    line = handler_log(fake, CELL)
    assert line["event"] == "extract_invocation" and line["statusCode"] == 200
    assert_no_secrets(world, fake.invocations(CELL)[-1].output, json.dumps(remote.to_dict()))


@pytest.mark.parametrize(
    "url", ["/proc/self/environ", "file:///etc/passwd", "https://evil.example/ATL06_x.h5"]
)
def test_an_extract_event_naming_a_local_or_foreign_granule_is_refused(world, fake, client, url):
    event = _extract_request(world, world.lambda_store).to_event()
    event["granule_url"] = url
    before = _store_objects(world, world.lambda_store)

    status, error, raw = _invoke_event(client, CELL, event)

    assert status == 400 and "granule_urls[0]" in error
    assert _store_objects(world, world.lambda_store) == before
    assert "root:" not in raw and "PATH=" not in raw


def test_an_extract_into_a_store_outside_the_allow_list_is_refused(world, fake, client):
    named, real = next(iter(world.foreign_stores.items()))
    before = _store_objects(world, real)

    status, error, _ = _invoke_event(client, CELL, _extract_request(world, named).to_event())

    assert status == 400 and "MAGG_ALLOWED_STORES" in error
    assert _store_objects(world, real) == before


# -- requests the handler refuses -----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"granule_urls": None, "store_path": None}, ("granule_urls", "store_path")),
        ({"parent_order": "six"}, ("parent_order",)),
    ],
    ids=["missing", "invalid"],
)
def test_bad_fields_are_named_in_a_400(world, fake, client, change, named):
    event = world.request(world.lambda_store).to_event()
    for key, value in change.items():
        if value is None:
            del event[key]
        else:
            event[key] = value
    response = client.invoke(FunctionName=CELL, Payload=json.dumps(event).encode(), LogType="Tail")
    raw = response["Payload"].read().decode()
    payload = json.loads(raw)

    assert "FunctionError" not in response and payload["statusCode"] == 400
    error = json.loads(payload["body"])["error"]
    assert all(name in error for name in named), error
    line = handler_log(fake, CELL)
    assert line["statusCode"] == 400 and line["error"] == error
    log_tail = base64.b64decode(response["LogResult"]).decode()
    assert json.dumps(line) in log_tail
    assert_no_secrets(world, raw, log_tail)


def _other_orders(word: int) -> dict[str, tuple[int, str]]:
    """Words no order-6 cell event may name, and what the refusal says about each."""
    return {
        "order-7": (word + 1, "is a morton word of order 7, not of order 6"),
        "no-cell": (0, "is not a morton word (it names no HEALPix cell)"),
        "too-big": (2**64, "is not a uint64 morton word"),
    }


@pytest.mark.parametrize("case", ["order-7", "no-cell", "too-big"])
def test_a_cell_event_for_no_cell_of_its_order_is_refused_untouched(
    world, fake, client, case, monkeypatch
):
    """What the CLI checks of a catalog's cells (mortie decides), the events check too:
    through the Invoke API, and calling the handler as Lambda does."""
    monkeypatch.setenv("MAGG_ALLOWED_STORES", ALLOWED)
    word, says = _other_orders(world.data_parent)[case]
    event = {**world.request(world.lambda_store).to_event(), "parent_morton": str(word)}
    before = _store_objects(world, world.lambda_store)

    status, error, _ = _invoke_event(client, CELL, event)
    direct = lambda_handler(event, None)

    assert status == 400 and f"parent_morton {word} {says}" in error, error
    assert direct["statusCode"] == 400 and json.loads(direct["body"])["error"] == error
    assert _store_objects(world, world.lambda_store) == before


@pytest.mark.parametrize("case", ["order-7", "repeated"])
def test_an_extract_event_for_no_cell_of_its_order_is_refused_untouched(world, fake, client, case):
    event = _extract_request(world, world.lambda_store).to_event()
    if case == "repeated":
        event["parents"] = [*event["parents"], event["parents"][0]]
        says = "parents lists a morton word more than once"
    else:
        word, says = _other_orders(world.spare_parent)[case]
        event["parents"] = [*event["parents"], str(word)]
        says = f"parents[2] {word} {says}"
    before = _store_objects(world, world.lambda_store)

    status, error, _ = _invoke_event(client, CELL, event)

    assert status == 400 and says in error, error
    assert _store_objects(world, world.lambda_store) == before


def test_a_cell_event_listing_one_granule_twice_is_refused_untouched(world, fake, client):
    """Two spellings of one object (or one file in two buckets) would count its points
    twice; the granule is named with both positions."""
    first = world.granule_urls[0]
    https = "https://data.nsidc.earthdatacloud.nasa.gov/" + first.removeprefix("s3://")
    copy = "s3://another-bucket/ATL06/" + first.rsplit("/", 1)[1]
    before = _store_objects(world, world.lambda_store)
    for twice in ((first, https), (first, copy)):
        event = world.request(world.lambda_store)
        event = {**event.to_event(), "granule_urls": [*world.granule_urls, twice[1]]}

        status, error, _ = _invoke_event(client, CELL, event)

        name = first.rsplit("/", 1)[1]
        assert status == 400, error
        assert f"granule_urls[{len(world.granule_urls)}] is granule {name!r} again" in error
    assert _store_objects(world, world.lambda_store) == before


def test_unsafe_expression_in_config_is_rejected_naming_the_key(world, fake, client):
    config = world.config.to_dict()
    config["aggregation"]["columns"]["weight"] = "__import__('os').system('id')"
    request = world.request(world.lambda_store, config=config)

    with pytest.raises(LambdaRequestRejected) as caught:
        invoke_cell(client, CELL, request)
    assert "aggregation.columns.weight" in str(caught.value)
    assert not is_retryable(caught.value)
    assert_no_secrets(world, str(caught.value), fake.invocations(CELL)[-1].output)


def test_cell_missing_from_the_store_template_is_rejected(world, client):
    outsider = int(point_morton(np.array([-80.0]), np.array([10.0]), 6)[0])
    request = world.request(world.lambda_store, parent_morton=outsider, chunk_idx=None)

    with pytest.raises(LambdaRequestRejected, match="not in the store's template") as caught:
        invoke_cell(client, CELL, request)
    assert not is_retryable(caught.value)


def test_handler_masks_credentials_echoed_by_an_error(world, capsys, monkeypatch):
    monkeypatch.setenv("MAGG_ALLOWED_STORES", ALLOWED)
    secret = world.s3.credentials.secret_access_key
    event = world.request(f"ftp://bucket/{secret}.zarr").to_event()

    response = lambda_handler(event, None)  # called locally: no Lambda context
    assert response["statusCode"] == 400
    error = json.loads(response["body"])["error"]
    assert "scheme 'ftp' is not s3" in error and "***" in error
    log = capsys.readouterr().out
    assert json.loads(log)["error"] == error
    assert_no_secrets(world, response["body"], log)


# -- untrusted URLs: granules must be S3 objects, stores below the allow-list ----------


def _store_objects(world: World, url: str) -> dict[str, str]:
    """Every object of a store: key → ETag (what a write would change)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    pages = world.s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix.rstrip("/") + "/"
    )
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _invoke_event(client, name: str, event: dict) -> tuple[int, str, str]:
    """Invoke with a raw event; the handler's status, error (if any) and raw payload."""
    response = client.invoke(FunctionName=name, Payload=json.dumps(event).encode())
    raw = response["Payload"].read().decode()
    assert "FunctionError" not in response, raw
    payload = json.loads(raw)
    return payload["statusCode"], json.loads(payload["body"]).get("error", ""), raw


def test_local_files_named_by_an_event_are_refused_unread(world, fake, client):
    """The issue's event: before, the handler read both and echoed their first bytes."""
    event = world.request(world.lambda_store).to_event()
    event["granule_urls"] = ["/proc/self/environ", "file:///etc/passwd"]

    status, error, raw = _invoke_event(client, CELL, event)

    assert status == 400
    assert "granule_urls[0]: scheme '' (a local path) is not accepted" in error
    assert "granule_urls[1]: scheme 'file' (a local file) is not accepted" in error
    assert "root:" not in raw and "PATH=" not in raw  # /etc/passwd, the environment
    line = handler_log(fake, CELL)
    assert line["statusCode"] == 400 and "files_processed" not in line
    assert_no_secrets(world, raw, fake.invocations(CELL)[-1].output)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("{local}", "scheme '' (a local path)"),
        ("relative/ATL06_20181014103720_02410111_007_01.h5", "scheme '' (a local path)"),
        ("file://{local}", "scheme 'file' (a local file)"),
        ("http://127.0.0.1:9/ATL06.h5", "scheme 'http'"),
        ("https://evil.example/x.h5", "scheme 'https' of host 'evil.example'"),
        (
            "https://data.nsidc.earthdatacloud.nasa.gov@evil.example/b/x.h5",
            "scheme 'https' of host 'evil.example'",
        ),
        ("s3:/x", "s3 URL has no bucket"),
        ("", "empty granule URL"),
        ("s3://magg-lambda-in/../etc/passwd", "'..' climbs above the bucket"),
        ("s3://magg-lambda-in", "s3 URL of bucket 'magg-lambda-in' names no object"),
    ],
    ids=[
        "abs-path", "relative-path", "file-url", "http", "https-other-host",
        "https-userinfo-trick", "s3-no-bucket", "empty", "s3-dotdot", "s3-bucket-only",
    ],
)  # fmt: skip
def test_granule_urls_that_are_not_s3_objects_are_refused_naming_index_and_scheme(
    world, s3_env, monkeypatch, capsys, bad, named
):
    """Every shape through the real handler, in-process (the fake runs the same code)."""
    monkeypatch.setenv("MAGG_ALLOWED_STORES", ALLOWED)
    before = _store_objects(world, world.lambda_store)
    event = world.request(world.lambda_store).to_event()
    event["granule_urls"] = [world.granule_urls[0], bad.format(local=world.local_granules[1])]

    response = lambda_handler(event, None)

    assert response["statusCode"] == 400, response
    error = json.loads(response["body"])["error"]
    assert f"granule_urls[1]: {named}" in error and "granule_urls[0]" not in error
    assert json.loads(capsys.readouterr().out)["statusCode"] == 400
    assert _store_objects(world, world.lambda_store) == before  # nothing ran


def test_other_spellings_of_an_s3_object_read_the_same_granules(world, fake, client):
    """``S3://`` is ``s3://``; NSIDC's https form is mapped to its ``s3://`` object."""
    first, second = world.granule_urls
    https = "https://DATA.nsidc.earthdatacloud.nasa.gov/" + second.removeprefix("s3://")
    spelled = world.request(
        world.lambda_store, granule_urls=("S3://" + first.removeprefix("s3://"), https)
    )

    result = invoke_cell(client, CELL, spelled)
    canonical = invoke_cell(client, CELL, world.request(world.lambda_store))

    assert result.status == "ok" and result.files_processed == 2 and not result.files_failed
    assert _comparable(result) == _comparable(canonical)


@pytest.mark.parametrize(
    "again",
    [
        lambda url: url,
        lambda url: "s3://" + url.removeprefix("s3://").replace("/", "//", 1),  # s3://b//key
        lambda url: "https://data.nsidc.earthdatacloud.nasa.gov/" + url.removeprefix("s3://"),
        lambda url: "s3://another-bucket/" + url.removeprefix("s3://").partition("/")[2],
        lambda url: url.replace("_01.h5", "_02.h5"),  # another revision
        lambda url: url.replace("_007_", "_006_"),  # another release
    ],
    ids=["same", "double-slash", "nsidc-https", "other-bucket", "revision", "release"],
)
def test_a_cell_event_listing_one_acquisition_twice_is_refused_unread(world, fake, client, again):
    """Every point of the granule would have counted twice (h_sigma shrunk by √2)."""
    first, second = world.granule_urls
    before = _store_objects(world, world.lambda_store)
    event = world.request(world.lambda_store).to_event()
    event["granule_urls"] = [first, second, again(first)]

    status, error, raw = _invoke_event(client, CELL, event)

    assert status == 400, raw
    assert "granule_urls[2]" in error and "granule_urls[0]" in error
    assert "again" in error or "two revisions or releases of one acquisition" in error
    assert _store_objects(world, world.lambda_store) == before
    assert handler_log(fake, CELL)["statusCode"] == 400


def test_an_extract_event_listing_a_parent_twice_is_refused(world, fake, client):
    event = _extract_request(world, world.lambda_store).to_event()
    event["parents"] = [event["parents"][0], *event["parents"]]
    before = _store_objects(world, world.lambda_store)

    status, error, _ = _invoke_event(client, CELL, event)

    assert status == 400 and f"more than once ({event['parents'][0]})" in error
    assert _store_objects(world, world.lambda_store) == before


@pytest.mark.parametrize("index", range(4), ids=["sibling", "other-bucket", "dotdot", "S3-dot"])
def test_a_store_outside_the_allow_list_is_refused_untouched(world, fake, client, index):
    named, real = list(world.foreign_stores.items())[index]
    before = _store_objects(world, real)
    assert before  # a valid template: only the allow-list stands in the way

    status, error, raw = _invoke_event(client, CELL, world.request(named).to_event())

    assert status == 400
    assert "is not below a prefix allowed by MAGG_ALLOWED_STORES" in error
    assert f"({ALLOWED}/)" in error
    assert _store_objects(world, real) == before
    assert_no_secrets(world, raw)


def test_without_an_allow_list_the_function_writes_no_store(world, fake, client):
    before = _store_objects(world, world.lambda_store)

    event = world.request(world.lambda_store).to_event()
    status, error, _ = _invoke_event(client, NO_ALLOW_LIST, event)

    assert status == 400 and error.startswith("MAGG_ALLOWED_STORES is not set")
    assert _store_objects(world, world.lambda_store) == before


# -- failures ---------------------------------------------------------------------------


def test_a_store_refusing_the_function_is_a_permanent_500(world, fake, client):
    # A policy refusing the write refuses it again: is_transient calls a 403 permanent.
    with pytest.raises(LambdaCellFailed, match="PermissionDenied") as caught:
        invoke_cell(client, S3_DENIED, world.request(world.lambda_store))
    assert isinstance(caught.value, PermanentError) and not is_retryable(caught.value)
    line = handler_log(fake, S3_DENIED)
    assert line["statusCode"] == 500 and "PermissionDenied" in line["error"]
    assert_no_secrets(world, str(caught.value), fake.invocations(S3_DENIED)[-1].output)


@pytest.mark.parametrize(
    ("raised", "status", "kind", "expected"),
    [
        ("input", 400, "input", LambdaRequestRejected),
        ("transient", 500, "transient", LambdaCellError),
        ("credentials", 500, "transient", CredentialsRejectedError),
        ("permanent", 500, "permanent", LambdaCellFailed),
    ],
)
def test_the_branch_of_a_failure_crosses_the_invocation(
    world, fake, client, raised, status, kind, expected
):
    name = RAISES.format(raised)
    with pytest.raises(expected) as caught:
        invoke_cell(client, name, world.request(world.lambda_store))
    assert type(caught.value) is expected and caught.value.kind == kind
    assert is_transient(caught.value) is (kind == "transient")
    assert is_retryable(caught.value) is (expected is LambdaCellError)
    assert handler_log(fake, name)["statusCode"] == status

    _, _, raw = _invoke_event(client, name, world.request(world.lambda_store).to_event())
    body = json.loads(json.loads(raw)["body"])
    assert body["error_kind"] == kind
    assert body.get("credentials_rejected", False) is (raised == "credentials")


def test_a_500_without_a_branch_is_retried_as_before(world, client):
    """A handler older than ``error_kind`` answers a bare 500: retried, as every 500 was."""
    with pytest.raises(LambdaCellError, match="disk full") as caught:
        invoke_cell(client, BARE_500, world.request(world.lambda_store))
    assert is_retryable(caught.value)


def test_function_timeout_is_a_function_error(world, fake, client):
    with pytest.raises(LambdaFunctionError, match="Task timed out after 2.00 seconds") as caught:
        invoke_cell(client, TIMES_OUT, world.empty_request())
    assert caught.value.error_type == "Sandbox.Timedout"
    assert not is_retryable(caught.value)
    assert fake.received(TIMES_OUT) == 1


def test_function_error_message_is_redacted_by_the_client(world, fake, client):
    with pytest.raises(LambdaFunctionError) as caught:
        invoke_cell(client, LEAKY, world.request(world.lambda_store))
    message = str(caught.value)
    assert caught.value.error_type == "RuntimeError" and "could not sign with ***" in message
    assert_no_secrets(world, message)
    # The fake really sent the secret back: the client is what removed it.
    assert world.s3.credentials.secret_access_key in fake.invocations(LEAKY)[-1].output


def test_crashed_function_is_a_function_error(world, client):
    with pytest.raises(LambdaFunctionError, match="exit status 137") as caught:
        invoke_cell(client, CRASHES, world.empty_request())
    assert caught.value.error_type == "Runtime.ExitError"
    assert not is_retryable(caught.value)


def test_errors_survive_pickling_with_their_details():
    # Prefect persists a failed task's exception; it must come back intact.
    error = LambdaFunctionError(
        "Sandbox.Timedout: Task timed out",
        error_type="Sandbox.Timedout",
        function_name="magg-cell",
        parent_morton=2**63 + 5,
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is LambdaFunctionError and str(copy) == str(error)
    assert (copy.error_type, copy.parent_morton) == ("Sandbox.Timedout", 2**63 + 5)
    assert is_retryable(pickle.loads(pickle.dumps(LambdaThrottled("throttled"))))


def test_a_response_that_is_not_a_cell_answer_is_not_retried(world, client):
    with pytest.raises(LambdaInvokeError, match="unexpected handler response") as caught:
        invoke_cell(client, WRONG_SHAPE, world.request(world.lambda_store))
    assert type(caught.value) is LambdaUnexpectedResponse and not is_retryable(caught.value)


def test_throttle_is_raised_once_not_retried_by_botocore(world, fake, client):
    fake.function(THROTTLED).throttle_next = 1
    with pytest.raises(LambdaThrottled, match="Rate Exceeded") as caught:
        invoke_cell(client, THROTTLED, world.empty_request())
    assert is_retryable(caught.value)
    # Had botocore retried, its second request would have run the cell and succeeded.
    assert [i.outcome for i in fake.invocations(THROTTLED)] == ["throttled"]

    result = invoke_cell(client, THROTTLED, world.empty_request())
    assert result.status == "no_granules"
    assert [i.outcome for i in fake.invocations(THROTTLED)] == ["throttled", "ok"]


def test_unknown_function_is_a_plain_client_error(world, client):
    with pytest.raises(ClientError) as caught:
        invoke_cell(client, "no-such-function", world.empty_request())
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert not is_retryable(caught.value)


def test_unreachable_endpoint_is_retryable(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = lambda_client(closed, lambda_client_config(FUNCTION_TIMEOUT_S))
    with pytest.raises(EndpointConnectionError) as caught:
        invoke_cell(client, CELL, world.request(world.lambda_store))
    assert is_retryable(caught.value)


# -- the double-invocation trap (docs/architecture.md §Lambda invocation) -------------


def test_client_config_outwaits_the_function_and_never_retries():
    config = lambda_client_config(720)
    assert config.read_timeout > 720
    assert config.connect_timeout <= 10
    assert config.retries["total_max_attempts"] == 1
    with pytest.raises(ValueError):
        lambda_client_config(0)


def test_max_attempts_1_still_sends_two_requests(world, fake):
    """The trap, reproduced: botocore reads ``max_attempts`` as *retries*."""
    before = fake.received(SLOW)
    trap = Config(
        read_timeout=WOULD_BE_READ_TIMEOUT_S, retries={"mode": "legacy", "max_attempts": 1}
    )
    with pytest.raises(LambdaTimeout):
        invoke_cell(lambda_client(fake.url, trap), SLOW, world.empty_request())
    fake.wait_idle()
    assert fake.received(SLOW) - before == 2


def test_a_read_timeout_is_reported_not_retried(world, fake, monkeypatch):
    # Ambient settings that would otherwise turn retries back on must not win.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    before = fake.received(SLOW)
    impatient = lambda_client_config(FUNCTION_TIMEOUT_S).merge(
        Config(read_timeout=WOULD_BE_READ_TIMEOUT_S)
    )
    with pytest.raises(LambdaTimeout) as caught:
        invoke_cell(lambda_client(fake.url, impatient), SLOW, world.empty_request())
    assert is_retryable(caught.value)
    fake.wait_idle()
    assert fake.received(SLOW) - before == 1


def test_slow_cell_is_invoked_exactly_once_and_answers(world, fake, client):
    before = fake.received(SLOW)
    started = time.monotonic()
    result = invoke_cell(client, SLOW, world.empty_request())
    assert time.monotonic() - started >= SLOW_DELAY_S > WOULD_BE_READ_TIMEOUT_S
    assert result.status == "no_granules" and result.parent_morton == world.spare_parent
    fake.wait_idle()
    assert fake.received(SLOW) - before == 1
