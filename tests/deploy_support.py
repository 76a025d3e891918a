"""Real Prefect processes for the deployment tests: a server, the CLI, workers.

Everything here starts what a user starts — ``prefect server start``,
``prefect work-pool create`` (through ``deployments/work-pools.sh``),
``prefect deploy --all`` from the repository's ``prefect.yaml``,
``prefect worker start`` — as subprocesses on loopback, each with its own
throw-away ``PREFECT_HOME``, and talks to them only through their APIs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The virtualenv's scripts: ``prefect`` and the ``python`` that has magg installed."""

ALL_DEPLOYMENTS = {
    "process-cycle/local": "magg-process",
    "process-cycle/lambda": "magg-process",
    "process-cycle/ecs": "magg-process",
    "process-cell/ecs": "magg-ecs",
    "extract-granule/ecs": "magg-ecs",
    "watch-cycles/antarctica": "magg-process",
    "height-change/local": "magg-process",
}
"""Every deployment in ``prefect.yaml`` and its work pool."""

SERVER_START_TIMEOUT_S = 120
RETRIED_STATUSES = {429, 502, 503}
"""Answers Prefect's own client retries (``prefect.client.base``): the server sends 503
for failures a client may retry, such as SQLite's "database is locked" while a worker
polls and ``prefect deploy`` writes."""
API_ATTEMPTS = 5
CLI_TIMEOUT_S = 300

_QUIET_PREFECT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_CLI_COLORS": "false",
    "PREFECT_CLI_WRAP_LINES": "false",
    "NO_COLOR": "1",
    "COLUMNS": "200",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect, AWS or Earthdata settings.

    A subprocess should see only what the test gives it: an ``AWS_*`` or
    ``PREFECT_*`` variable leaking in from the developer's shell would make a
    test pass (or fail) for the wrong reason.
    """
    prefixes = ("PREFECT_", "AWS_", "EARTHDATA_", "MAGG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(_QUIET_PREFECT)
    env.update(extra)
    return env


class PrefectServer:
    """``prefect server start`` on a free loopback port, SQLite in a temporary home."""

    def __init__(self, workdir: Path, *, scheduler: bool = True):
        self.workdir = workdir
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = workdir / "server.log"
        # The UI's API address does not follow --port (it stays :4200 in
        # prefect 3.9): without this, a browser on the UI talks to whatever
        # server owns :4200, or to nothing.
        self._env = clean_environment(
            PREFECT_HOME=str(workdir / "server-home"),
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED=str(scheduler).lower(),
            PREFECT_UI_API_URL=self.api_url,
        )
        self._process: subprocess.Popen | None = None

    def start(self) -> PrefectServer:
        self._process = subprocess.Popen(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=self._env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prefect server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not answer in {SERVER_START_TIMEOUT_S} s")

    @property
    def pid(self) -> int:
        """The ``prefect server start`` process (its server runs in it or its children)."""
        if self._process is None:
            raise RuntimeError("the server is not started")
        return self._process.pid

    def stop(self) -> None:
        _stop(self._process)

    def client_env(self, home: Path, **extra: str) -> dict[str, str]:
        """Environment for a CLI command or worker that talks to this server."""
        home.mkdir(parents=True, exist_ok=True)
        return clean_environment(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(home), **extra)

    # --- the REST API, as the UI uses it ----------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One REST call; an answer the server marks retryable is retried, as Prefect's own
        client does (:data:`RETRIED_STATUSES`), up to :data:`API_ATTEMPTS` times in all."""
        for attempt in range(API_ATTEMPTS):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            response = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
            if response.status_code not in RETRIED_STATUSES:
                break
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment(self, name: str) -> dict[str, Any]:
        flow, deployment = name.split("/")
        return self.api("GET", f"/deployments/name/{flow}/{deployment}")

    def flow_runs(self, deployment: str) -> list[dict[str, Any]]:
        """Every flow run of a deployment (``flow/name``), oldest first."""
        deployment_id = self.deployment(deployment)["id"]
        return self.api(
            "POST",
            "/flow_runs/filter",
            json={
                "deployments": {"id": {"any_": [deployment_id]}},
                "sort": "EXPECTED_START_TIME_ASC",
            },
        )

    def flow_run(self, run_id: UUID | str) -> dict[str, Any]:
        return self.api("GET", f"/flow_runs/{run_id}")

    def create_run(self, deployment: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
        deployment_id = self.deployment(deployment)["id"]
        return self.api(
            "POST",
            f"/deployments/{deployment_id}/create_flow_run",
            json={"parameters": dict(parameters)},
        )

    def retry(self, run_id: UUID | str) -> None:
        """What the UI's Retry button sends (docs/architecture.md §Prefect)."""
        self.api(
            "POST",
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
        )

    def logs(self, run_ids: list[str]) -> list[str]:
        """The log messages of these flow runs (and their task runs)."""
        messages: list[str] = []
        offset = 0
        while True:
            page = self.api(
                "POST",
                "/logs/filter",
                json={"logs": {"flow_run_id": {"any_": run_ids}}, "limit": 200, "offset": offset},
            )
            messages += [entry["message"] for entry in page]
            if len(page) < 200:
                return messages
            offset += 200

    def wait_final(self, run_id: str, timeout_s: float, *, after: int = 0) -> dict[str, Any]:
        """Poll until the run is in a final state (on its ``after+1``-th attempt or later)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            state = run.get("state") or {}
            if state.get("type") in FINAL and run["run_count"] > after:
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} not final after {timeout_s} s: {run.get('state')}")


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_cli(
    args: list[str], env: Mapping[str, str], *, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """Run a command: a script path relative to ``cwd``, or a program of the virtualenv.

    A failure shows everything the command printed.
    """
    program = cwd / args[0] if "/" in args[0] else BIN / args[0]
    command = [str(program), *args[1:]]
    result = subprocess.run(
        command, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    printed = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\n{printed}"
    return result


@contextmanager
def worker(pool: str, env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``prefect worker start --pool POOL`` for the duration of the block."""
    process = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"},
        cwd=tempfile.gettempdir(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen | None) -> None:
    """Stop a process we started, and its children, by its process group."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
