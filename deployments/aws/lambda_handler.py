"""AWS Lambda entry point: one parent cell, or one granule's extract, per invocation.

A run's first stage sends extract events (``"kind": "extract"``: one granule
into fragments, see :mod:`magg_core.extract.granule`), its second cell events with
``from_fragments``. A cell event without it reads its granules itself, as
the seed's did. The event and the ``{"statusCode", "body"}`` answer are the seed's, so existing
orchestrators keep working: 200 carries the :class:`CellResult` (also when the
cell's status is ``failed`` — that is an outcome, and the caller decides what
to do with it), 400 a request that can never run (missing fields, a granule
that is not an S3 object or is listed twice, a parent that is no cell of its
order, a store outside the operator's allow-list, a config that does not
validate, a store without this cell in its template: the check every entry
point makes, :func:`magg_core.schema.check_request`; every
:class:`~magg_core.errors.InputError`), 500 anything else. A 500's body says
in ``error_kind`` which branch of :class:`~magg_core.errors.MaggError` the
failure belongs to (``"transient"``: worth a retry; ``"permanent"``: not), and
in ``credentials_rejected`` whether S3 refused the credentials sent, so the
caller retries with fresh ones; ``error_type`` names the exception's class for
people reading logs, and no program reads it.
Answering 500 instead of raising keeps the error message under our control:
an unhandled exception would put a traceback into the invoke response.

Only the standard library and magg_core: the Lambda layer has no Prefect.
The handler is configured as ``deployments.aws.lambda_handler.lambda_handler``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from magg_core.errors import CredentialsRejectedError, InputError, error_kind
from magg_core.extract.granule import extract_granule
from magg_core.grid.cell import process_cell
from magg_core.schema import (
    EXTRACT_EVENT,
    LAMBDA,
    CellRequest,
    CellResult,
    ExtractRequest,
    ExtractResult,
)

CALLER_ERRORS = (InputError,)
"""Failures that repeat on every attempt until the caller changes something: 400.

Among them :class:`~magg_core.schema.RequestError`,
:class:`~magg_core.urls.URLError`, :class:`~magg_core.config.ConfigError`,
:class:`~magg_core.store.arrays.TemplateMismatchError` and
:class:`~magg_core.errors.CellDataError`."""


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """Validate the event, process the cell, answer like the seed's handler.

    Parameters
    ----------
    event
        The cell request as a Lambda event (see :meth:`CellRequest.from_event`:
        its granules must be S3 objects), or, with ``"kind": "extract"``, one
        granule to extract into fragments (:meth:`ExtractRequest.from_event`).
        Its ``store_path`` must lie below a prefix of the function's
        ``MAGG_ALLOWED_STORES`` (set at deploy time; unset refuses every store).
        Its ``config`` is validated before any work.
    context
        The Lambda context; only ``aws_request_id`` is used, for the log line.

    Returns
    -------
    dict
        ``{"statusCode": 200 | 400 | 500, "body": <JSON string>}``.
    """
    started = time.perf_counter()
    secrets = _event_secrets(event)
    extract = isinstance(event, Mapping) and event.get("kind") == EXTRACT_EVENT
    line: dict[str, Any] = {
        "event": "extract_invocation" if extract else "cell_invocation",
        "request_id": getattr(context, "aws_request_id", None),
        "parent_morton": _field(event, "parent_morton"),
        "granule_count": _granule_count(event),
    }
    try:
        run = _extract if extract else _cell
        result = run(event)
    except CALLER_ERRORS as exc:
        status, body = 400, {"error": str(exc), "error_kind": exc.kind}
    except Exception as exc:  # noqa: BLE001 - anything else is the 500 answer
        status = 500
        body = {
            "error": f"{type(exc).__name__}: {exc}",
            "error_type": type(exc).__name__,
            "error_kind": error_kind(exc),
            "credentials_rejected": isinstance(exc, CredentialsRejectedError),
        }
    else:
        status, body = 200, result.to_dict()
        line.update(_result_fields(result) if isinstance(result, CellResult) else body)
    line.update(statusCode=status, handler_s=round(time.perf_counter() - started, 3))
    if status != 200:
        line["error"] = body["error"]
    _log(_scrub(line, secrets))
    return {"statusCode": status, "body": json.dumps(_scrub(body, secrets))}


def _cell(event: Any) -> CellResult:
    return process_cell(CellRequest.from_event(event, LAMBDA))


def _extract(event: Any) -> ExtractResult:
    return extract_granule(ExtractRequest.from_event(event, LAMBDA))


def _result_fields(result: CellResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "cells_with_data": result.cells_with_data,
        "total_obs": result.total_obs,
        "files_processed": result.files_processed,
        "files_failed": len(result.files_failed),
        "duration_s": {k: round(v, 3) for k, v in vars(result.duration_s).items()},
        "peak_rss_mb": result.peak_rss_mb,
        "error": result.error,
    }


def _event_secrets(event: Any) -> tuple[str, ...]:
    """Every credential string the event carries, even when it fails validation."""
    credentials = event.get("s3_credentials") if isinstance(event, Mapping) else None
    if not isinstance(credentials, Mapping):
        return ()
    return tuple(v for v in credentials.values() if isinstance(v, str) and v)


def _field(event: Any, name: str) -> str | None:
    value = event.get(name) if isinstance(event, Mapping) else None
    return None if value is None else str(value)  # uint64 words stay exact as strings


def _granule_count(event: Any) -> int | None:
    urls = event.get("granule_urls") if isinstance(event, Mapping) else None
    return len(urls) if isinstance(urls, list) else None


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """``value`` with every credential string masked, however deep it sits.

    Exception text from S3 clients and readers can echo request details; the
    body and the log line go through this so credentials never leave.
    """
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, Mapping):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, secrets) for v in value]
    return value


def _log(line: dict[str, Any]) -> None:
    """One JSON line on stdout, which Lambda ships to CloudWatch as one event."""
    sys.stdout.write(json.dumps(line, default=str) + "\n")
    sys.stdout.flush()
