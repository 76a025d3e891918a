"""Which failures are worth retrying.

A retry costs a cell's full runtime, so only failures that can succeed on a
second attempt are retried: throttling, server errors, timeouts, dropped
connections and expired temporary credentials (each attempt fetches fresh
ones). A bad config, a template mismatch or a corrupt granule fail the same
way every time and are reported at once instead.
"""

from __future__ import annotations

import re
from typing import Any

import botocore.exceptions as botocore_errors
import obstore.exceptions as obstore_errors

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)


class CellTimeoutError(TimeoutError):
    """A cell ran past its deadline; it stopped before writing anything."""


class TransientReadError(ConnectionError):
    """A granule read failed for a reason that may pass (throttling, network, expiry)."""


class CellFailedError(RuntimeError):
    """Every granule of a cell failed to read; the message lists why."""


class CellsFailedError(RuntimeError):
    """Some cells of a run failed; raised after every other cell has finished.

    ``summary`` is the run's summary (the flow's would-be return value), so a
    caller can still report the run.
    """

    def __init__(self, message: str, *, summary: dict[str, Any] | None = None):
        # Only the message in ``args``, the summary a keyword with a default:
        # the exception pickles (Prefect persists a failed run's exception).
        super().__init__(message)
        self.summary = summary


def is_transient(exc: BaseException) -> bool:
    """True if retrying the same work may succeed."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(
        exc,
        botocore_errors.ConnectionError
        | botocore_errors.ReadTimeoutError
        | botocore_errors.ConnectTimeoutError,
    ):
        return True
    if isinstance(exc, botocore_errors.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in THROTTLING_CODES or _transient_status(status)
    if isinstance(exc, obstore_errors.PermissionDeniedError | obstore_errors.UnauthenticatedError):
        return "expired" in str(exc).lower()
    if isinstance(exc, obstore_errors.GenericError):
        # obstore has already retried 5xx/429 with backoff; what reaches us is
        # an exhausted retry budget, a transport error (no status), a 400 whose
        # S3 code says "try again" (ExpiredToken, RequestTimeout: S3 answers
        # both with 400), or a definite client error such as 416 for a range
        # past a truncated file.
        code = _S3_CODE.search(str(exc))
        if code is not None and code.group(1) in THROTTLING_CODES:
            return True
        status = _HTTP_STATUS.search(str(exc))
        return status is None or _transient_status(int(status.group(1)))
    return False


_HTTP_STATUS = re.compile(r"status code: (\d{3})")
_S3_CODE = re.compile(r"<Code>(\w+)</Code>")


def _transient_status(status: int) -> bool:
    return status in (408, 429) or status >= 500
