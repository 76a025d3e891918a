"""Run one cell on AWS Lambda with plain boto3, and say what went wrong in one word.

The Prefect task layer owns retries, so this module makes sure botocore never
retries on its own: a synchronous ``Invoke`` that times out on the client side
has usually *reached* the function, and botocore's default retry silently ran a
>60 s cell twice (docs/architecture.md §Lambda invocation). Everything that can
come back — the handler's ``{"statusCode", "body"}`` envelope, a
``FunctionError`` (which boto3 reports as a normal response, not an exception),
a throttle, a client timeout — becomes either a
:class:`~magg_core.schema.CellResult` or one exception class whose branch of
:class:`~magg_core.errors.MaggError` (and :func:`is_retryable` answer) the task
layer can use as its retry condition. A handler's 500 names its failure's
branch in the body's ``error_kind`` field, which is decoded here into the class
of that branch.

No Prefect here: the same client serves flows, scripts and tests.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from magg_core.errors import (
    CredentialsRejectedError,
    ErrorKind,
    InputError,
    MaggError,
    PermanentError,
    TransientError,
)
from magg_core.schema import CellRequest, CellResult, ExtractRequest, ExtractResult

READ_TIMEOUT_MARGIN_S = 30
"""How much longer than the function timeout the client waits for an answer.

Lambda ends a synchronous call at the function timeout, so the response is
due by then; the margin covers cold start and the trip back.
"""

CONNECT_TIMEOUT_S = 10
"""Opening the connection is quick or broken; no reason to wait long."""

THROTTLE_CODES = frozenset({"TooManyRequestsException"})


class LambdaInvokeError(MaggError, RuntimeError):
    """A cell invocation that produced no :class:`CellResult`.

    The common base of the classes below, which say in which branch of
    :class:`~magg_core.errors.MaggError` the failure falls; never raised itself.

    Attributes
    ----------
    retryable
        Whether invoking the same request again may succeed (the failure is
        transient). Re-running a cell is idempotent (it owns its chunks), so
        this is about *usefulness*, not safety.
    """

    @property
    def retryable(self) -> bool:
        return isinstance(self, TransientError)

    def __init__(
        self,
        message: str,
        *,
        function_name: str | None = None,
        parent_morton: int | None = None,
        granule: str | None = None,
    ):
        # ``args`` holds only the message and the keywords have defaults, so the
        # exception pickles (Prefect persists a failed task's exception) and
        # unpickling restores the attributes from ``__dict__``.
        super().__init__(message)
        self.function_name = function_name
        self.parent_morton = parent_morton
        self.granule = granule

    def __str__(self) -> str:
        subject = f"granule {self.granule}" if self.granule else f"cell {self.parent_morton}"
        return f"{self.function_name} {subject}: {self.args[0]}"


class LambdaRequestRejected(LambdaInvokeError, InputError):
    """The handler answered 400: the request itself is wrong; sending it again won't help."""


class LambdaCellError(LambdaInvokeError, TransientError):
    """The handler answered 500 with a transient failure (often S3 trouble): worth retrying.

    A 500 without ``error_kind`` (a handler older than the field) is taken as
    this, as every 500 used to be.
    """


class LambdaCellFailed(LambdaInvokeError, PermanentError):
    """The handler answered 500 with a permanent failure: the same cell fails again.

    For example a store whose policy refuses the function's writes, or a bug.
    """


class LambdaUnexpectedResponse(LambdaInvokeError, PermanentError):
    """The function answered something that is not the handler's envelope."""


class LambdaFunctionError(LambdaInvokeError, PermanentError):
    """The function did not return at all: it raised, crashed, ran out of memory or time.

    Not retryable: a cell that exceeds the function's timeout or memory will do
    so again (and a timeout bills the full duration each time); these need a
    bigger function or a smaller cell, not another attempt.
    """

    def __init__(self, message: str, *, error_type: str | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.error_type = error_type


class LambdaThrottled(LambdaInvokeError, TransientError):
    """Lambda refused to start the function (concurrency limit); it never ran."""


class LambdaTimeout(LambdaInvokeError, TransientError):
    """No answer within the client's read timeout (set above the function timeout).

    Lambda itself would have answered by then, so this is network trouble; the
    cell may or may not have run, and running it again is harmless.
    """


def lambda_client_config(function_timeout_s: int) -> Config:
    """botocore settings for synchronous cell invocations.

    Parameters
    ----------
    function_timeout_s
        The Lambda function's configured timeout.

    Returns
    -------
    Config
        ``read_timeout`` is the function timeout plus
        :data:`READ_TIMEOUT_MARGIN_S`, so the client outwaits the function
        (botocore's 60 s default does not outwait a 720 s function), and
        ``retries={"total_max_attempts": 1}`` so botocore never sends a second
        request. Note that ``{"max_attempts": 1}`` would *not* do: botocore
        reads ``max_attempts`` as retries after the first attempt, i.e. two
        requests. ``mode`` is pinned so ``AWS_RETRY_MODE`` cannot change it.
    """
    if function_timeout_s <= 0:
        raise ValueError(f"function_timeout_s must be positive, got {function_timeout_s!r}")
    return Config(
        read_timeout=function_timeout_s + READ_TIMEOUT_MARGIN_S,
        connect_timeout=CONNECT_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": 1},
    )


def invoke_cell(client: Any, function_name: str, request: CellRequest) -> CellResult:
    """Invoke the cell handler synchronously and return its result.

    Parameters
    ----------
    client
        A boto3 ``lambda`` client, ideally built with :func:`lambda_client_config`.
    function_name
        Function name or ARN (with optional qualifier).
    request
        The cell to run; its credentials travel in the payload and nowhere else.

    Returns
    -------
    CellResult
        Whatever the handler reported, including ``status="failed"``: a cell
        whose granules all failed is an answer, and the caller decides.

    Raises
    ------
    LambdaRequestRejected, LambdaCellError, LambdaCellFailed, LambdaFunctionError,
    LambdaThrottled, LambdaTimeout, LambdaUnexpectedResponse
        See :func:`is_retryable`.
    CredentialsRejectedError
        S3 refused the request's credentials (a 500 whose body has
        ``"credentials_rejected": true``); retry with fresh ones. Messages
        never contain the request's secrets.
    """
    where = {"function_name": function_name, "parent_morton": request.parent_morton}
    return CellResult.from_dict(_invoke(client, request.to_event(), request, where))


def invoke_extract(client: Any, function_name: str, request: ExtractRequest) -> ExtractResult:
    """Invoke the handler with an extract event; as :func:`invoke_cell`, for one granule."""
    where = {"function_name": function_name, "granule": request.name}
    return ExtractResult.from_dict(_invoke(client, request.to_event(), request, where))


def _invoke(
    client: Any,
    event: dict[str, Any],
    request: CellRequest | ExtractRequest,
    where: dict[str, Any],
) -> dict[str, Any]:
    """One synchronous invocation; the handler's 200 body, or the exception its answer means."""
    function_name = where["function_name"]
    secrets = request.s3_credentials.secrets() if request.s3_credentials else ()
    try:
        response = client.invoke(
            FunctionName=function_name,
            InvocationType="RequestResponse",
            Payload=json.dumps(event).encode(),
        )
    except ReadTimeoutError as exc:
        raise LambdaTimeout(f"no response: {exc}", **where) from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if error.get("Code") in THROTTLE_CODES or status == 429:
            message = _redact(f"throttled: {error.get('Message', '')}", secrets)
            raise LambdaThrottled(message, **where) from None
        raise

    raw = response["Payload"].read()
    if response.get("FunctionError"):
        payload = _json_or_none(raw)
        if isinstance(payload, dict):
            error_type = payload.get("errorType")
            kind = error_type or response["FunctionError"]
            message = f"{kind}: {payload.get('errorMessage', '')}"
        else:
            error_type, message = None, f"{response['FunctionError']} error"
        raise LambdaFunctionError(_redact(message, secrets), error_type=error_type, **where)

    status, body = _envelope(raw)
    if status == 200 and isinstance(body, dict):
        return body
    body = body if isinstance(body, dict) else {}
    detail = body.get("error", "")
    if status == 400:
        raise LambdaRequestRejected(_redact(f"rejected: {detail}", secrets), **where)
    if status == 500 and body.get("credentials_rejected") is True:
        # S3 refused the credentials sent: the caller retries with fresh ones.
        raise CredentialsRejectedError(_redact(f"{function_name}: {detail}", secrets))
    if status == 500:
        kind = body.get("error_kind")
        failed = (
            _FAILURE_CLASSES.get(kind, LambdaCellError)
            if isinstance(kind, str)
            else LambdaCellError
        )
        raise failed(_redact(f"cell failed: {detail}", secrets), **where)
    raise LambdaUnexpectedResponse(
        f"unexpected handler response (statusCode {status!r}, {len(raw)} bytes)", **where
    )


_FAILURE_CLASSES: dict[ErrorKind, type[LambdaInvokeError]] = {
    "input": LambdaRequestRejected,
    "transient": LambdaCellError,
    "permanent": LambdaCellFailed,
}
"""The class a handler's 500 is raised as, by its body's ``error_kind``."""


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt at the same cell may succeed.

    ``True`` for throttles, client read timeouts, handler 500s, and connection
    failures that happened before the request was sent (nothing can have run).
    ``False`` for rejected requests, function errors, and anything unknown.
    """
    if isinstance(exc, LambdaInvokeError):
        return exc.retryable
    return isinstance(exc, (ConnectTimeoutError, EndpointConnectionError))


def _envelope(raw: bytes) -> tuple[Any, Any]:
    """The handler's ``(statusCode, body)``; the body is a JSON string, like the seed's."""
    payload = _json_or_none(raw)
    if not isinstance(payload, dict):
        return None, None
    body = payload.get("body")
    if isinstance(body, str):
        body = _json_or_none(body.encode())
    return payload.get("statusCode"), body


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    """Belt and braces: the handler never echoes secrets, but messages cross trust lines."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
