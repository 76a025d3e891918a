"""Which failures are worth retrying.

A retry costs a cell's full runtime, so only failures that can succeed on a
second attempt are retried: throttling, server errors, timeouts, dropped
connections and credentials S3 refused (expired, invalid or denied: the
retry runs with fresh ones). A bad config, a template mismatch or a corrupt granule fail the same
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
CREDENTIAL_REJECTION_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidAccessKeyId",
        "AccessDenied",
    }
)
"""S3 error codes that refuse the caller's credentials, not the object: a fresh set
(NSIDC hands out new temporary credentials on request) may succeed."""


class CellTimeoutError(TimeoutError):
    """A cell ran past its deadline; it stopped before writing anything."""


class TransientReadError(ConnectionError):
    """A granule read failed for a reason that may pass (throttling, network, expiry)."""


class CredentialsRejectedError(TransientReadError):
    """S3 refused the request's credentials (expired, invalid, access denied).

    Says nothing about the granule: the cell is retried with fresh credentials
    (:meth:`magg_core.credentials.Credentials.reject`), never left with a hole.
    """


class CellDataError(ValueError):
    """The points of a cell give no valid statistics (e.g. a non-finite mean); not retried."""


class CellFailedError(RuntimeError):
    """A cell did not produce complete statistics: it ``failed`` or is ``partial``.

    ``result`` is the cell's :class:`~magg_core.request.CellResult` when it has
    one (which granules failed and why), so the run still reports the cell.
    """

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect persists a failed task's exception; keep the result through pickling.
        return type(self), (self.args[0], self.result)


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
    """True if retrying the same work may succeed.

    A 403 is permanent here: on the run's own store it means a policy refuses
    the write. Granule reads, made with NSIDC's temporary credentials, turn
    refusals into :class:`CredentialsRejectedError` first (see
    :func:`rejects_credentials`), which is transient.
    """
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


def rejects_credentials(exc: BaseException) -> bool:
    """True if S3 refused the caller's credentials rather than the request.

    S3 answers expired or revoked session tokens with 400 (``ExpiredToken``,
    ``InvalidToken``, ``TokenRefreshRequired``) and unknown keys or missing
    grants with 403 (``InvalidAccessKeyId``, ``AccessDenied``); obstore maps
    401/403 to its own classes and leaves the 400s as generic errors carrying
    S3's XML body. A run is granted the bucket it reads, so a 403 means its
    credentials no longer hold, not that one granule is forbidden.

    The same refusal of a ``HEAD`` has no body to name it: S3 answers a bare
    400 (or 403). Every request magg sends is well formed, so a 400 or 403
    without an S3 error code is taken as the credentials' rejection too
    (botocore then reports the status itself as the code, ``"400"``).
    """
    if isinstance(exc, CredentialsRejectedError):
        return True
    if isinstance(exc, obstore_errors.PermissionDeniedError | obstore_errors.UnauthenticatedError):
        return True
    if isinstance(exc, botocore_errors.ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return code in CREDENTIAL_REJECTION_CODES or code in _BODYLESS_REFUSALS
    if isinstance(exc, obstore_errors.GenericError):
        code = _S3_CODE.search(str(exc))
        if code is not None:
            return code.group(1) in CREDENTIAL_REJECTION_CODES
        status = _HTTP_STATUS.search(str(exc))
        return status is not None and status.group(1) in _BODYLESS_REFUSALS
    return False


_HTTP_STATUS = re.compile(r"status code: (\d{3})")
_BODYLESS_REFUSALS = frozenset({"400", "403"})
"""Statuses of a refusal without an S3 error code (a ``HEAD``): the credentials'."""
_S3_CODE = re.compile(r"<Code>(\w+)</Code>")


def _transient_status(status: int) -> bool:
    return status in (408, 429) or status >= 500
