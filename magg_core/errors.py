"""One root for magg's errors, and which failures are worth retrying.

Every exception class magg defines derives from :class:`MaggError` through
exactly one of three branches, which is what a caller needs to decide what to
do next:

- :class:`InputError` -- the caller's input is wrong (a config, a request, a
  URL, a store made for another grid). Retrying cannot help; the caller must
  change something. The Lambda handler answers these with 400.
- :class:`TransientError` -- the same work may succeed if tried again:
  throttling, timeouts, dropped connections, credentials S3 refused (the
  retry runs with fresh ones).
- :class:`PermanentError` -- the work will fail the same way again, but not
  because of the caller's input: a corrupt or truncated granule, a cell whose
  statistics are incomplete, a service that kept failing after its own retries.

Each class keeps the builtin base it had (``ValueError``, ``ConnectionError``
...), so ``except ValueError`` still catches a bad config. The branch travels
across process boundaries as a word, :attr:`MaggError.kind` (see
:func:`error_kind`, :func:`error_from_kind`): the Lambda handler's 500 body
and the final state of an ECS child run carry it, and the client side raises
the matching class again (docs/architecture.md §Lambda and ECS events).

A retry costs a cell's full runtime, so only transient failures are retried.
Failures raised by libraries (botocore, obstore) are classified by
:func:`is_transient` and :func:`rejects_credentials`.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

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


ErrorKind = Literal["input", "transient", "permanent"]
"""The branch of :class:`MaggError` a failure belongs to, as it travels in JSON."""

ERROR_KINDS: tuple[ErrorKind, ...] = ("input", "transient", "permanent")


class MaggError(Exception):
    """The root of every exception magg defines; catch a branch, not this, to act on it.

    ``kind`` names the branch (:data:`ErrorKind`).
    """

    kind: ClassVar[ErrorKind]


class InputError(MaggError):
    """The caller's input is wrong; the same input fails again, so it is never retried.

    Exists so that a service can answer "fix your request" (Lambda's 400)
    instead of spending retries on work that cannot succeed.
    """

    kind: ClassVar[ErrorKind] = "input"


class TransientError(MaggError):
    """The work may succeed if tried again (throttling, timeouts, refused credentials).

    Exists so that retry policies have one thing to test: a retry costs a
    cell's full runtime, and only these failures can repay it.
    """

    kind: ClassVar[ErrorKind] = "transient"


class PermanentError(MaggError):
    """The work fails the same way on every attempt, through no fault of the caller's input.

    Exists to tell the run's report apart from :class:`InputError`: a corrupt
    granule or a service that kept failing is reported, not retried, and the
    caller has nothing to fix in the request.
    """

    kind: ClassVar[ErrorKind] = "permanent"


class CellTimeoutError(TransientError, TimeoutError):
    """A cell ran past its deadline; it stopped before writing anything."""


class TransientReadError(TransientError, ConnectionError):
    """A granule read failed for a reason that may pass (throttling, network, expiry)."""


class CredentialsRejectedError(TransientReadError):
    """S3 refused the request's credentials (expired, invalid, access denied).

    Says nothing about the granule: the cell is retried with fresh credentials
    (:meth:`magg_core.access.credentials.Credentials.reject`), never left with a hole.
    """


class _GroupOutcomes:
    """What every item of a group (one task run's cells or granules) came to.

    ``results`` holds the result of each item that has one (a cell's
    :class:`~magg_core.schema.CellResult`, complete, partial or failed; a
    granule's :class:`~magg_core.schema.ExtractResult`); ``failures`` maps each
    other item's key (a parent morton word, a granule URL) to why it raised.
    The flow reports each item from them, as it would from one task run each.
    """

    def __init__(self, message: str, results: Any = (), failures: Any = None):
        super().__init__(message)
        self.results = list(results)
        self.failures = dict(failures or {})

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect persists a failed task's exception; keep the outcomes through pickling.
        return type(self), (self.args[0], self.results, self.failures)


class GroupFailedError(_GroupOutcomes, PermanentError, RuntimeError):
    """Some items of a group did not complete, and no retry can change that."""


class GroupInterruptedError(_GroupOutcomes, TransientError, RuntimeError):
    """Some items of a group raised a failure that may pass: the group is retried, and
    its items already done (a cell's proven output, a granule's extract record) are not
    done again."""


class CellDataError(InputError, ValueError):
    """The points of a cell give no valid statistics (e.g. a non-finite mean); not retried."""


class CellFailedError(PermanentError, RuntimeError):
    """A cell did not produce complete statistics: it ``failed`` or is ``partial``.

    ``result`` is the cell's :class:`~magg_core.schema.CellResult` when it has
    one (which granules failed and why), so the run still reports the cell.
    """

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect persists a failed task's exception; keep the result through pickling.
        return type(self), (self.args[0], self.result)


class CellsFailedError(PermanentError, RuntimeError):
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

    magg's own errors answer by their branch (:class:`TransientError`).
    Library errors are judged by type and by the status and S3 error code they
    carry (:func:`s3_answer`). A 403 is permanent here: on the run's own store
    it means a policy refuses the write. Granule reads, made with NSIDC's
    temporary credentials, turn refusals into :class:`CredentialsRejectedError`
    first (see :func:`rejects_credentials`), which is transient.
    """
    if isinstance(exc, MaggError):
        return exc.kind == "transient"
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
        status, code = s3_answer(exc)
        return code in THROTTLING_CODES or _transient_status(status or 0)
    if isinstance(exc, obstore_errors.PermissionDeniedError | obstore_errors.UnauthenticatedError):
        # An expired session token is worth a retry (with fresh credentials); a policy is not.
        return s3_answer(exc)[1] in THROTTLING_CODES
    if isinstance(exc, obstore_errors.GenericError):
        # obstore has already retried 5xx/429 with backoff; what reaches us is
        # an exhausted retry budget, a transport error (no status), a 400 whose
        # S3 code says "try again" (ExpiredToken, RequestTimeout: S3 answers
        # both with 400), or a definite client error such as 416 for a range
        # past a truncated file.
        status, code = s3_answer(exc)
        if code in THROTTLING_CODES:
            return True
        return status is None or _transient_status(status)
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
    if isinstance(exc, MaggError):
        return False
    if isinstance(exc, obstore_errors.PermissionDeniedError | obstore_errors.UnauthenticatedError):
        return True
    if isinstance(exc, botocore_errors.ClientError):
        code = s3_answer(exc)[1]
        return code in CREDENTIAL_REJECTION_CODES or code in _BODYLESS_REFUSALS
    if isinstance(exc, obstore_errors.GenericError):
        status, code = s3_answer(exc)
        if code is not None:
            return code in CREDENTIAL_REJECTION_CODES
        return status is not None and str(status) in _BODYLESS_REFUSALS
    return False


def s3_answer(exc: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and S3 error code of a failed S3 request: ``(status, code)``.

    botocore carries both as fields of :class:`~botocore.exceptions.ClientError`.
    obstore (0.12) carries neither: its exceptions hold only a message, into
    which it writes the status (``"status code: 403"``) and S3's XML reply
    (``<Code>ExpiredToken</Code>``), so for its errors, and only for them, the
    two are read from that message. Either is ``None`` when the failure has
    none (a dropped connection, a ``HEAD`` without a body).
    """
    if isinstance(exc, botocore_errors.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status, exc.response.get("Error", {}).get("Code")
    if isinstance(exc, obstore_errors.BaseError):
        text = str(exc)
        status = _HTTP_STATUS.search(text)
        code = _S3_CODE.search(text)
        return (
            int(status.group(1)) if status else None,
            code.group(1) if code else None,
        )
    return None, None


def error_kind(exc: BaseException) -> ErrorKind:
    """The branch ``exc`` belongs to, also for errors magg did not raise itself.

    A library's error is ``"transient"`` if :func:`is_transient` says so, else
    ``"permanent"``: only magg knows what input it was given. Refusals of a
    granule's credentials have become :class:`CredentialsRejectedError` by
    then (see :func:`magg_core.granules.read.permanent_failure`); a 403 that reaches
    here is the run's own store refusing a write, which a retry won't change.
    """
    if isinstance(exc, MaggError):
        return exc.kind
    return "transient" if is_transient(exc) else "permanent"


_ERROR_CLASSES: dict[str, type[MaggError]] = {
    "input": InputError,
    "transient": TransientError,
    "permanent": PermanentError,
}


def error_from_kind(kind: object, message: str) -> MaggError:
    """An exception of the branch named ``kind`` (a word from :data:`ERROR_KINDS`).

    For the receiving side of a boundary that carries :func:`error_kind` as a
    field. A missing or unknown word gives a :class:`PermanentError`: without
    the sender's word nothing says a retry could help.
    """
    cls = _ERROR_CLASSES.get(kind if isinstance(kind, str) else "", PermanentError)
    return cls(message)


_HTTP_STATUS = re.compile(r"status code: (\d{3})")
_BODYLESS_REFUSALS = frozenset({"400", "403"})
"""Statuses of a refusal without an S3 error code (a ``HEAD``): the credentials'."""
_S3_CODE = re.compile(r"<Code>(\w+)</Code>")


def _transient_status(status: int) -> bool:
    return status in (408, 429) or status >= 500
