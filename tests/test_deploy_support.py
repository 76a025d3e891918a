"""The tests' REST helper retries what Prefect's server marks retryable, and nothing else.

A loopback HTTP server answers a scripted sequence of statuses, as Prefect's
server does when SQLite is locked (503) or a proxy limits the rate (429).
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.deploy_support import PrefectServer
from tests.fakes.loopback import send_json, serve_on_loopback, shut_down


def answering(statuses: list[int]) -> tuple[ThreadingHTTPServer, list[int]]:
    """A server answering each request with the next status (the last one repeats)."""
    seen: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = statuses[min(len(seen), len(statuses) - 1)]
            seen.append(status)
            send_json(self, status, {"id": "run-1"} if status == 200 else {"detail": "no"})

        def log_message(self, *args):
            pass

    return serve_on_loopback(Handler), seen


@pytest.mark.parametrize("statuses", [[429, 200], [503, 502, 200]], ids=["429", "503-502"])
def test_retryable_answers_are_retried_until_the_server_answers(tmp_path, statuses):
    server, seen = answering(statuses)
    try:
        prefect = PrefectServer(tmp_path)
        prefect.api_url = f"http://127.0.0.1:{server.server_address[1]}/api"
        assert prefect.api("POST", "/deployments/x/create_flow_run", json={}) == {"id": "run-1"}
        assert seen == statuses
    finally:
        shut_down(server)


def test_other_failures_are_raised_at_once(tmp_path):
    server, seen = answering([500, 200])
    try:
        prefect = PrefectServer(tmp_path)
        prefect.api_url = f"http://127.0.0.1:{server.server_address[1]}/api"
        with pytest.raises(httpx.HTTPStatusError, match="500"):
            prefect.api("POST", "/deployments/x/create_flow_run", json={})
        assert seen == [500]
    finally:
        shut_down(server)
