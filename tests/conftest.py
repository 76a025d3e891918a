"""Shared fixtures: real servers on loopback, started by the tests themselves."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

# Prefect reads its settings at import: give the whole test session a private,
# throw-away home before anything imports prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="magg-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import boto3  # noqa: E402
import pytest

from bench.servers import moto_s3  # noqa: E402
from magg_core.access.s3 import S3Credentials, S3Endpoint  # noqa: E402

TEST_REGION = "us-west-2"


class MotoS3:
    """A moto S3 server on 127.0.0.1 with a boto3 client for test setup."""

    def __init__(self, url: str):
        self.url = url
        self.endpoint = S3Endpoint(url=url, region=TEST_REGION)
        # moto accepts any key; distinctive values let tests grep for leaks.
        self.credentials = S3Credentials(
            access_key_id="AKIATESTMAGG0000",
            secret_access_key="magg-test-secret-key-do-not-log",
            session_token="magg-test-session-token-do-not-log",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name=TEST_REGION,
            aws_access_key_id=self.credentials.access_key_id,
            aws_secret_access_key=self.credentials.secret_access_key,
        )

    def create_bucket(self, name: str) -> str:
        self.client.create_bucket(
            Bucket=name, CreateBucketConfiguration={"LocationConstraint": TEST_REGION}
        )
        return name

    def upload_dir(self, local_dir, bucket: str, prefix: str) -> list[str]:
        urls = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
            self.client.upload_file(str(path), bucket, key)
            urls.append(f"s3://{bucket}/{key}")
        return urls


@contextmanager
def running_moto() -> Iterator[MotoS3]:
    """moto's S3 server on a free loopback port, in a process of its own, while the block runs.

    Not a thread of the test process: freeing any h5py object takes h5py's
    global lock, so a garbage collection run by a server thread could wait on
    a reader that holds that lock (HDF5 reading through our driver) while it
    waits for that very server. Seen as a ranged GET that never returned.
    """
    with moto_s3(every_service=True) as server:
        yield MotoS3(server.endpoint.url)


@pytest.fixture(scope="session")
def moto_server():
    with running_moto() as server:
        yield server


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """Point ambient AWS settings at moto (as a Lambda role / ECS task would supply them)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.url)
    monkeypatch.setenv("AWS_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.credentials.secret_access_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return moto_server


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
