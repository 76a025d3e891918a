"""A loopback HTTPS fake of Earthdata Login and NSIDC's ``s3credentials`` endpoint.

earthaccess talks to it unchanged (only the host differs), over real TLS with
a certificate from a throwaway CA (``trustme``) that the tests trust through
``REQUESTS_CA_BUNDLE``:

- ``POST /api/users/find_or_create_token`` answers 401 with a Basic challenge
  until the request carries HTTP Basic credentials (earthaccess resends with
  them, as it does for the real service), then a bearer token
  ``{"access_token", "token_type", "expiration_date"}`` — or 401
  ``invalid_credentials`` for a wrong password;
- ``GET /s3credentials`` with ``Authorization: Bearer <token>`` answers
  ``{"accessKeyId", "secretAccessKey", "sessionToken", "expiration"}``,
  expiring ``lifetime_s`` from now in NSIDC's ``YYYY-MM-DD HH:MM:SS+00:00``
  form, fresh values on every call; 401 otherwise;
- :meth:`FakeEarthdata.fail_next` makes the next requests to ``s3credentials``
  fail in one of the ways the real endpoint fails for a moment (see
  :data:`FAILURE_KINDS`). Failure pages repeat the request's ``Authorization``
  header, as a careless error page might, so a test can prove that no error
  text quotes a body.

earthaccess recognises Earthdata's answers by hostname alone (not port) and
resends *every* request to that host with Basic credentials, so the two
services live on different loopback addresses (127.x.y.z, as in reality on
different hosts), Earthdata Login on port 443, which needs root. Apart from
the failure pages above, no error body echoes what was sent.
"""

from __future__ import annotations

import base64
import secrets
import socket
import ssl
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

from tests.fakes.loopback import send_json, serve, shut_down

FAILURE_KINDS = (
    "status",
    "maintenance_page",
    "login_page",
    "json_without_keys",
    "not_json",
    "drop",
    "reset",
    "stall",
    "truncated",
)
"""How ``s3credentials`` can fail for a moment:

- ``status``: the given HTTP status with an HTML error page (a load balancer's 503);
- ``maintenance_page``: 200 with Earthdata's HTML maintenance page;
- ``login_page``: a redirect to Earthdata Login's ``/oauth/authorize``, which
  answers 200 with an HTML login form;
- ``json_without_keys``: 200 with a JSON object lacking the credential fields;
- ``not_json``: 200 with a plain-text body;
- ``drop``: the connection closed without an answer;
- ``reset``: the connection reset (TCP RST) without an answer;
- ``stall``: no answer for ``stall_s``, then the connection closed;
- ``truncated``: a 200 whose body stops short of its ``Content-Length``.
"""


@dataclass
class IssuedKeys:
    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime


@dataclass
class FakeEarthdata:
    """Earthdata Login on ``https://<host>/`` and NSIDC's ``s3credentials_url``."""

    users: dict[str, str] = field(default_factory=dict)
    """username → password."""
    lifetime_s: float = 3600.0
    tokens: set[str] = field(default_factory=set)
    """Bearer tokens the s3credentials endpoint accepts (login adds to them)."""
    issued: list[IssuedKeys] = field(default_factory=list)
    logins: list[tuple[str, int]] = field(default_factory=list)
    """(username or "", HTTP status) per token request."""
    host: str = ""
    """Earthdata Login's host (port 443)."""
    s3credentials_url: str = ""
    ca_bundle: Path | None = None
    s3credentials_requests: int = 0
    """Requests that reached ``s3credentials``, failed ones included."""
    stall_s: float = 2.0
    """How long a ``stall`` failure keeps the client waiting."""
    _failures: deque[tuple[str, int]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    def fail_next(self, count: int, kind: str, status: int = 503) -> None:
        """Make the next ``count`` s3credentials requests fail as ``kind`` (after those queued)."""
        if kind not in FAILURE_KINDS:
            raise ValueError(
                f"failure kind must be one of {', '.join(FAILURE_KINDS)}, got {kind!r}"
            )
        with self._lock:
            self._failures.extend([(kind, status)] * count)

    def reset_failures(self) -> None:
        """Forget queued failures and zero the request count."""
        with self._lock:
            self._failures.clear()
            self.s3credentials_requests = 0

    def secrets(self) -> set[str]:
        """Every secret this fake knows or handed out, for leak checks."""
        values = set(self.users.values()) | set(self.tokens)
        for keys in self.issued:
            values |= {keys.secret_access_key, keys.session_token}
        return values

    def start(self, directory: Path) -> FakeEarthdata:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                fake._token_request(self)

            def do_GET(self) -> None:  # noqa: N802
                fake._s3credentials(self)

            def log_message(self, *args: Any) -> None:
                pass

        edl = _bind(Handler, 443)
        nsidc = _bind(Handler, 0)
        ca = trustme.CA()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(edl.server_address[0], nsidc.server_address[0]).configure_cert(context)
        for server in (edl, nsidc):
            server.socket = context.wrap_socket(server.socket, server_side=True)
            serve(server)
        self._servers = [edl, nsidc]
        self.host = edl.server_address[0]
        self.s3credentials_url = "https://{}:{}/s3credentials".format(*nsidc.server_address[:2])
        self.ca_bundle = directory / "earthdata-fake-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))
        return self

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            shut_down(server)

    # --- endpoints -------------------------------------------------------------------

    def _token_request(self, h: BaseHTTPRequestHandler) -> None:
        h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.path != "/api/users/find_or_create_token":
            send_json(h, 404, {"error": "not_found"})
            return
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            self.logins.append(("", 401))
            send_json(
                h,
                401,
                {"error": "unauthorized"},
                {"WWW-Authenticate": 'Basic realm="Earthdata Login"'},
            )
            return
        username, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        if self.users.get(username) != password:
            self.logins.append((username, 401))
            send_json(
                h,
                401,
                {"error": "invalid_credentials", "error_description": "Invalid user credentials"},
            )
            return
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        self.logins.append((username, 200))
        expires = datetime.now(UTC) + timedelta(days=60)
        send_json(
            h,
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expiration_date": f"{expires:%m/%d/%Y}",
            },
        )

    def _s3credentials(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/oauth/authorize"):
            _send(h, 200, "text/html", _LOGIN_PAGE.format(echo=_echo(h)))
            return
        if h.path != "/s3credentials":
            send_json(h, 404, {"error": "not_found"})
            return
        with self._lock:
            self.s3credentials_requests += 1
            failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            self._fail(h, *failure)
            return
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            send_json(
                h,
                401,
                {
                    "error": "Unauthorized",
                    "error_description": "a valid Earthdata token is required",
                },
            )
            return
        now = datetime.now(UTC).replace(microsecond=0)
        keys = IssuedKeys(
            access_key_id="ASIA" + secrets.token_hex(8).upper(),
            secret_access_key=secrets.token_urlsafe(30),
            session_token=secrets.token_urlsafe(60),
            expiration=now + timedelta(seconds=self.lifetime_s),
        )
        self.issued.append(keys)
        send_json(
            h,
            200,
            {
                "accessKeyId": keys.access_key_id,
                "secretAccessKey": keys.secret_access_key,
                "sessionToken": keys.session_token,
                "expiration": f"{keys.expiration:%Y-%m-%d %H:%M:%S+00:00}",
            },
        )

    def _fail(self, h: BaseHTTPRequestHandler, kind: str, status: int) -> None:
        echo = _echo(h)
        if kind == "status":
            _send(h, status, "text/html", _ERROR_PAGE.format(status=status, echo=echo))
        elif kind == "maintenance_page":
            _send(h, 200, "text/html; charset=utf-8", _MAINTENANCE_PAGE.format(echo=echo))
        elif kind == "login_page":
            location = f"https://{self.host}/oauth/authorize?response_type=code&client_id=fake"
            h.send_response(302)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif kind == "json_without_keys":
            send_json(h, 200, {"message": "credentials are being rotated", "echo": echo})
        elif kind == "not_json":
            _send(h, 200, "text/plain", f"Service busy, try later ({echo})")
        elif kind == "truncated":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "400")
            h.end_headers()
            h.wfile.write(b'{"accessKeyId": "ASIA')
            _close(h)
        elif kind == "stall":
            self._stopping.wait(self.stall_s)
            _close(h)
        elif kind == "reset":
            _close(h, reset=True)
        else:  # drop
            _close(h)


_ERROR_PAGE = "<html><body><h1>{status} Service Unavailable</h1><!-- {echo} --></body></html>"
_MAINTENANCE_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Earthdata Login - Maintenance</title></head>"
    "<body>Earthdata is down for scheduled maintenance.<!-- {echo} --></body></html>"
)
_LOGIN_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Earthdata Login</title></head><body>"
    '<form action="/login"><input type="hidden" name="debug" value="{echo}"></form></body></html>'
)


def _echo(h: BaseHTTPRequestHandler) -> str:
    """What a careless error page repeats: the request's Authorization header."""
    return h.headers.get("Authorization", "")


def _send(h: BaseHTTPRequestHandler, status: int, content_type: str, text: str) -> None:
    data = text.encode()
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


def _close(h: BaseHTTPRequestHandler, *, reset: bool = False) -> None:
    """End the connection without (the rest of) an answer; ``reset`` sends a TCP RST."""
    h.close_connection = True
    if not reset:
        h.connection.shutdown(socket.SHUT_RDWR)
        return
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.rfile.close()  # the socket closes for real (sending the RST) once no file holds it
    h.connection.close()


def _bind(handler: type[BaseHTTPRequestHandler], port: int) -> ThreadingHTTPServer:
    """A server on a random loopback address of its own (127.x.y.z)."""
    last_error: OSError | None = None
    for _ in range(20):
        octets = (secrets.randbelow(250) + 2 for _ in range(3))
        host = "127.{}.{}.{}".format(*octets)
        try:
            return ThreadingHTTPServer((host, port), handler)
        except PermissionError:  # port 443 needs root: nothing to retry
            raise
        except OSError as exc:  # address in use: draw another
            last_error = exc
    raise RuntimeError(f"no free loopback address for the Earthdata fake: {last_error}")
