"""A loopback fake of the AWS Lambda ``Invoke`` REST call that runs real handler code.

boto3's ``lambda`` client talks to it unchanged (only ``endpoint_url`` differs),
so request signing, serialization, error parsing and botocore's retry logic
all run for real. Each invocation runs the handler in a fresh Python process
(like a cold Lambda sandbox) with only the function's environment, enforces
the function timeout by killing it, and answers the way Lambda does
(shapes from botocore's ``lambda/2015-03-31`` service model):

==============================  ====  ==============================================
situation                       HTTP  response
==============================  ====  ==============================================
handler returned                200   its JSON; ``X-Amz-Executed-Version: $LATEST``
handler raised                  200   ``X-Amz-Function-Error: Unhandled``,
                                      ``{"errorMessage", "errorType", "stackTrace"}``
function timeout (killed)       200   ``Unhandled``, ``errorType`` ``Sandbox.Timedout``
no answer (crash, OOM kill,     200   ``Unhandled``, ``errorType`` ``Runtime.ExitError``
unserializable return value)
injected throttle               429   ``x-amzn-ErrorType: TooManyRequestsException``
unknown function                404   ``x-amzn-ErrorType: ResourceNotFoundException``
payload is not JSON             400   ``x-amzn-ErrorType: InvalidRequestContentException``
==============================  ====  ==============================================

``X-Amz-Log-Type: Tail`` returns the last 4 KB of the run's output, base64, in
``X-Amz-Log-Result``. Only ``RequestResponse`` invocations are supported.

Run as a script, this module is the in-sandbox runtime: it imports the handler,
feeds it the event from stdin, and writes the outcome to a result file.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Lambda's task root: the unzipped package, with ``deployments/`` and ``magg_core/``."""

DEFAULT_HANDLER = "deployments.aws.lambda_handler.lambda_handler"
ACCOUNT = "123456789012"
REGION = "us-west-2"
LOG_TAIL_BYTES = 4096
INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")


@dataclass
class FakeFunction:
    """One deployed function: handler, timeout, environment, and test knobs."""

    name: str
    handler: str = DEFAULT_HANDLER
    timeout_s: float = 30.0
    environment: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 2048
    delay_s: float = 0.0
    """Extra execution time: the answer comes no sooner than this after the start
    (still subject to the timeout), as if the handler had been this slow."""
    throttle_next: int = 0
    """The next this-many invocations are refused with 429 and never run."""


@dataclass(frozen=True)
class Invocation:
    """What one Invoke call did, as the fake saw it."""

    function_name: str
    request_id: str
    outcome: str
    """``ok`` | ``unhandled`` | ``timeout`` | ``throttled`` | ``rejected`` (payload not JSON)."""
    duration_s: float
    output: str
    """Everything the sandbox wrote to stdout and stderr (what CloudWatch would hold)."""


@dataclass
class _Run:
    """One sandbox run: what to answer and what to record."""

    output: str
    duration: float
    outcome: str = "ok"
    function_error: str | None = None
    payload: bytes = b"null"

    def failed(self, outcome: str, error_type: str, message: str) -> _Run:
        """The run as Lambda reports a runtime-level failure (no handler payload)."""
        self.outcome, self.function_error = outcome, "Unhandled"
        self.payload = json.dumps({"errorMessage": message, "errorType": error_type}).encode()
        return self


class FakeLambda:
    """The fake service: ``with FakeLambda() as fake: fake.add_function(...)``.

    Attributes
    ----------
    url
        ``http://127.0.0.1:PORT``, for ``boto3.client("lambda", endpoint_url=...)``.
    """

    def __init__(self) -> None:
        self._functions: dict[str, FakeFunction] = {}
        self._invocations: list[Invocation] = []
        self._received: dict[str, int] = {}
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLambda:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            running = list(self._running)
        for process in running:  # sandboxes still busy after their client gave up
            process.kill()
            process.wait()

    def add_function(self, name: str, **settings: Any) -> FakeFunction:
        function = FakeFunction(name=name, **settings)
        with self._lock:
            self._functions[name] = function
        return function

    def function(self, name: str) -> FakeFunction:
        """The live settings of a function; change ``delay_s``/``throttle_next`` between calls."""
        return self._functions[name]

    def received(self, name: str) -> int:
        """Invoke requests that reached the service for ``name``, counted on arrival.

        Counted before any work, so a request the client abandoned (read
        timeout) and then sent again counts twice even while both still run.
        """
        with self._lock:
            return self._received.get(name, 0)

    def invocations(self, name: str | None = None) -> list[Invocation]:
        """Finished invocations (throttled ones included), oldest first."""
        with self._lock:
            return [i for i in self._invocations if name is None or i.function_name == name]

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Block until no sandbox is running (e.g. after a client timed out on one)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running and sum(self._received.values()) == len(self._invocations):
                    return
            time.sleep(0.05)
        raise TimeoutError("fake Lambda still busy")

    # -- service side -------------------------------------------------------

    def _invoke(self, name: str, payload: bytes, tail: bool) -> tuple[int, dict[str, str], bytes]:
        request_id = str(uuid.uuid4())
        headers = {"x-amzn-RequestId": request_id}
        with self._lock:
            function = self._functions.get(name)
            if function is None:
                return _error(
                    404,
                    "ResourceNotFoundException",
                    "Message",
                    f"Function not found: {_arn(name)}",
                    headers,
                )
            self._received[name] = self._received.get(name, 0) + 1
            throttled = function.throttle_next > 0
            if throttled:
                function.throttle_next -= 1
        if throttled:
            self._record(Invocation(name, request_id, "throttled", 0.0, ""))
            headers["Retry-After"] = "1"
            return _error(
                429,
                "TooManyRequestsException",
                "message",
                "Rate Exceeded.",
                headers,
                Reason="ReservedFunctionConcurrentInvocationLimitExceeded",
            )
        try:
            event = json.loads(payload or b"{}")
        except ValueError as exc:
            self._record(Invocation(name, request_id, "rejected", 0.0, ""))
            return _error(
                400,
                "InvalidRequestContentException",
                "message",
                f"Could not parse request body into json: {exc}",
                headers,
            )

        run = self._run(function, request_id, event)
        self._record(Invocation(name, request_id, run.outcome, run.duration, run.output))
        headers["X-Amz-Executed-Version"] = "$LATEST"
        if run.function_error:
            headers["X-Amz-Function-Error"] = run.function_error
        if tail:
            log = (
                f"START RequestId: {request_id} Version: $LATEST\n{run.output}"
                f"END RequestId: {request_id}\n"
                f"REPORT RequestId: {request_id}\tDuration: {run.duration * 1000:.2f} ms\t"
                f"Memory Size: {function.memory_mb} MB\n"
            ).encode()
            headers["X-Amz-Log-Result"] = base64.b64encode(log[-LOG_TAIL_BYTES:]).decode()
        headers["Content-Type"] = "application/json"
        return 200, headers, run.payload

    def _run(self, function: FakeFunction, request_id: str, event: Any) -> _Run:
        """Run the handler in a fresh process, as a new sandbox would."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fake-lambda-") as sandbox:
            result_path = Path(sandbox) / "result.json"
            process = subprocess.Popen(
                [sys.executable, __file__, function.handler, str(result_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=sandbox,
                env=self._sandbox_env(function, request_id, sandbox),
            )
            with self._lock:
                self._running.add(process)
            try:
                output, _ = process.communicate(
                    json.dumps(event).encode(), timeout=function.timeout_s
                )
                busy_until = started + min(function.delay_s, function.timeout_s)
                time.sleep(max(0.0, busy_until - time.monotonic()))
                timed_out = function.delay_s >= function.timeout_s
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
                timed_out = True
            finally:
                with self._lock:
                    self._running.discard(process)
            run = _Run(output=output.decode(errors="replace"), duration=time.monotonic() - started)
            if timed_out:
                return run.failed(
                    "timeout",
                    "Sandbox.Timedout",
                    f"RequestId: {request_id} Error: Task timed out after "
                    f"{function.timeout_s:.2f} seconds",
                )
            if not result_path.exists():
                return run.failed(
                    "unhandled",
                    "Runtime.ExitError",
                    f"RequestId: {request_id} Error: Runtime exited with error: "
                    f"exit status {process.returncode}",
                )
            result = json.loads(result_path.read_bytes())
            run.payload = json.dumps(result["payload"]).encode()
            if result["raised"]:
                run.outcome, run.function_error = "unhandled", "Unhandled"
            return run

    def _sandbox_env(self, function: FakeFunction, request_id: str, sandbox: str) -> dict[str, str]:
        """A Lambda-like environment: the function's variables, not the test process's."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": sandbox,
            "TMPDIR": sandbox,
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO_ROOT),
            "LAMBDA_TASK_ROOT": str(REPO_ROOT),
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_LAMBDA_FUNCTION_NAME": function.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "_HANDLER": function.handler,
            "_X_AMZN_REQUEST_ID": request_id,
            "_FAKE_LAMBDA_DEADLINE": str(time.time() + function.timeout_s),
        }
        env.update(function.environment)
        return env

    def _record(self, invocation: Invocation) -> None:
        with self._lock:
            self._invocations.append(invocation)


def _make_handler(fake: FakeLambda) -> type[BaseHTTPRequestHandler]:
    class InvokeHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            match = INVOKE_PATH.match(urlsplit(self.path).path)
            if match is None:
                status, headers, payload = _error(
                    404, "UnknownOperationException", "message", "Unknown operation", {}
                )
            elif self.headers.get("X-Amz-Invocation-Type", "RequestResponse") != "RequestResponse":
                status, headers, payload = _error(
                    400,
                    "InvalidParameterValueException",
                    "message",
                    "this fake supports only RequestResponse invocations",
                    {},
                )
            else:
                name = _function_name(unquote(match["name"]))
                tail = self.headers.get("X-Amz-Log-Type") == "Tail"
                status, headers, payload = fake._invoke(name, body, tail)
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (read timeout); Lambda ran it anyway

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # keep pytest output clean; invocations are recorded instead

    return InvokeHandler


def _function_name(name_or_arn: str) -> str:
    """``name``, ``name:qualifier`` or an ARN → the bare function name."""
    if name_or_arn.startswith("arn:"):
        return name_or_arn.split(":")[6]
    return name_or_arn.split(":")[0]


def _arn(name: str) -> str:
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"


def _error(
    status: int, code: str, message_key: str, message: str, headers: dict[str, str], **extra: str
) -> tuple[int, dict[str, str], bytes]:
    """A Lambda service error: code in ``x-amzn-ErrorType``, ``{"Type": "User", ...}`` body."""
    headers = {**headers, "x-amzn-ErrorType": code, "Content-Type": "application/json"}
    return status, headers, json.dumps({"Type": "User", message_key: message, **extra}).encode()


# -- the sandbox runtime (this file run as a script) -------------------------


@dataclass(frozen=True)
class _Context:
    """The attributes of Lambda's context object that handlers use."""

    aws_request_id: str
    function_name: str
    function_version: str
    memory_limit_in_mb: int
    invoked_function_arn: str
    deadline: float

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.time()) * 1000))


def _run_sandbox(handler_path: str, result_path: str) -> None:
    module_name, _, attribute = handler_path.rpartition(".")
    context = _Context(
        aws_request_id=os.environ["_X_AMZN_REQUEST_ID"],
        function_name=os.environ["AWS_LAMBDA_FUNCTION_NAME"],
        function_version=os.environ["AWS_LAMBDA_FUNCTION_VERSION"],
        memory_limit_in_mb=int(os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"]),
        invoked_function_arn=_arn(os.environ["AWS_LAMBDA_FUNCTION_NAME"]),
        deadline=float(os.environ["_FAKE_LAMBDA_DEADLINE"]),
    )
    event = json.loads(sys.stdin.buffer.read())
    try:
        handler = getattr(importlib.import_module(module_name), attribute)
        payload = handler(event, context)
    except Exception as exc:  # noqa: BLE001 - reported like the Python runtime does
        traceback.print_exc()
        stack = traceback.format_tb(exc.__traceback__)
        outcome = _raised(context, type(exc).__name__, str(exc), stack)
    else:
        outcome = json.dumps({"raised": False, "payload": payload})
    Path(result_path).write_text(outcome)


def _raised(context: _Context, error_type: str, message: str, stack: list[str]) -> str:
    payload = {
        "errorMessage": message,
        "errorType": error_type,
        "requestId": context.aws_request_id,
        "stackTrace": stack,
    }
    return json.dumps({"raised": True, "payload": payload})


if __name__ == "__main__":
    _run_sandbox(sys.argv[1], sys.argv[2])
