"""Servers the benchmarks talk to, each in a process of its own.

moto holds the GIL while it serves a request: in the benchmark's own
process it would steal CPU from the code being measured. So moto (and the
latency proxy) run as child processes, started here and stopped by pid.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3

from bench._common import REPO, tree_cpu_seconds
from magg_core.access.s3 import S3Credentials, S3Endpoint

REGION = "us-west-2"
CREDENTIALS = S3Credentials(access_key_id="AKIABENCHMAGG000", secret_access_key="bench-secret")


@dataclass(frozen=True)
class Server:
    """A server running in a child process."""

    endpoint: S3Endpoint
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time the server's process and its children have used so far (Linux ``/proc``)."""
        return tree_cpu_seconds(self.pid)


@contextmanager
def _child(args: list[str]) -> Iterator[tuple[int, int]]:
    """Run ``python -m <args>`` until the block ends; yields its port and pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{args[0]} did not start (printed {line!r})")
        yield int(line.split()[1]), proc.pid
    finally:
        proc.stdin.close()  # the child's signal to stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def moto_s3(*, every_service: bool = False) -> Iterator[Server]:
    """A moto S3 server on loopback, in its own process.

    ``every_service``: moto's whole dispatcher (IAM, Lambda, ... beside S3), as the
    tests' deploy checks need, at about twice the CPU per S3 request.
    """
    args = ["bench.servers", *(["--every-service"] if every_service else [])]
    with _child(args) as (port, pid):
        yield Server(S3Endpoint(url=f"http://127.0.0.1:{port}", region=REGION), pid)


@contextmanager
def latency_proxy(upstream: S3Endpoint, delay_ms: float) -> Iterator[Server]:
    """The same server behind :mod:`bench.latency_proxy`."""
    args = ["bench.latency_proxy", "--upstream", upstream.url, "--delay-ms", str(delay_ms)]
    with _child(args) as (port, pid):
        yield Server(S3Endpoint(url=f"http://127.0.0.1:{port}", region=upstream.region), pid)


@contextmanager
def range_server(root: Path) -> Iterator[Server]:
    """:mod:`bench.range_server` serving ``root/<bucket>/<key>``, in its own process."""
    with _child(["bench.range_server", str(root)]) as (port, pid):
        yield Server(S3Endpoint(url=f"http://127.0.0.1:{port}", region=REGION), pid)


def s3_client(endpoint: S3Endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=CREDENTIALS.access_key_id,
        aws_secret_access_key=CREDENTIALS.secret_access_key,
    )


def upload(endpoint: S3Endpoint, bucket: str, files: dict[str, str]) -> None:
    """Create ``bucket`` and upload local files to it (``key -> path``), directly (no proxy)."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    for key, path in files.items():
        client.upload_file(path, bucket, key)


def _serve_moto(every_service: bool) -> None:
    """moto's S3 backend app (or its whole dispatcher) on werkzeug's threaded server.

    By default not ``ThreadedMotoServer``'s dispatcher: it works out the AWS
    service of every request anew (scanning moto's modules), which doubles
    moto's ~2 ms of CPU per request; the S3 app alone answers the same S3 API.
    """
    import logging
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    app = (
        DomainDispatcherApplication(create_backend_app)
        if every_service
        else create_backend_app("s3")
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"PORT {server.server_port}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin
    server.shutdown()


if __name__ == "__main__":
    _serve_moto(every_service="--every-service" in sys.argv[1:])
