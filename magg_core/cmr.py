"""Granule search in NASA's CMR, with a timeout and bounded retries.

The query is python-cmr's ``GranuleQuery`` in earthaccess's subclass
``DataGranules``, which pages through every result with ``CMR-Search-After``
over a ``requests`` session it lets us supply. python-cmr's own pager calls
``requests.get`` with no timeout and no retry, and a full cycle takes several
2,000-granule pages; so the session carries both: each request times out,
and throttling (429), server errors (5xx), timeouts and dropped connections
are retried with exponential backoff (honouring ``Retry-After``) by urllib3.
A retried page resends the same search-after token, so paging never restarts
or repeats. When the budget is spent, :class:`CmrError` names CMR, the URL
and the query.

The base URL is CMR's search root (python-cmr's ``mode``): production by
default, ``MAGG_CMR_URL`` or an argument to point elsewhere (a test fake).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import requests
from cmr import CMR_OPS
from earthaccess import DataGranules
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from magg_core.cycles import TimeRange

CMR_URL_ENV = "MAGG_CMR_URL"
RETRY_STATUSES = (429, 500, 502, 503, 504)


class CmrError(RuntimeError):
    """CMR kept failing or refused the query; the message names the URL and query."""


@dataclass(frozen=True)
class GranuleSearch:
    """What to ask CMR for. Defaults: ATL06 version 007 in NSIDC's cloud provider."""

    short_name: str = "ATL06"
    version: str = "007"
    provider: str = "NSIDC_CPRD"
    time_range: TimeRange | None = None
    bounding_box: tuple[float, float, float, float] | None = None
    """``(west, south, east, north)`` in degrees; ``west > east`` crosses ±180°."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for the catalog's metadata and error messages."""
        return {
            "short_name": self.short_name,
            "version": self.version,
            "provider": self.provider,
            "temporal": list(self.time_range.isoformat()) if self.time_range else None,
            "bounding_box": list(self.bounding_box) if self.bounding_box else None,
        }

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.to_dict().items() if v is not None)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one CMR request before giving up."""

    attempts: int = 6
    """Tries per request, the first included."""
    backoff_s: float = 2.0
    """Waits between tries grow as 0, 2·b, 4·b, … seconds (urllib3's schedule), capped below."""
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0
    """Per request: to connect, and between bytes of the answer."""


def cmr_url(url: str | None = None) -> str:
    """The CMR search root to use: ``url``, else ``$MAGG_CMR_URL``, else production."""
    url = url or os.environ.get(CMR_URL_ENV) or CMR_OPS
    return url if url.endswith("/") else url + "/"


def search_granules(
    search: GranuleSearch, *, url: str | None = None, retry: RetryPolicy = RetryPolicy()
) -> list[dict[str, Any]]:
    """All granules matching ``search``, as UMM-G items ``{"meta": …, "umm": …}``.

    Raises
    ------
    CmrError
        When a request still fails after ``retry.attempts`` tries, or CMR
        rejects the query outright (e.g. HTTP 400).
    """
    base = cmr_url(url)
    query = DataGranules(mode=base)
    query.session = _session(retry)
    query.short_name(search.short_name).version(search.version).provider(search.provider)
    if search.time_range is not None:
        query.temporal(search.time_range.start, search.time_range.end)
    if search.bounding_box is not None:
        query.bounding_box(*search.bounding_box)
    try:
        with warnings.catch_warnings():
            # earthaccess warns about a future API change on every granule it wraps.
            warnings.simplefilter("ignore", FutureWarning)
            granules = query.get_all()
    except (requests.RequestException, RuntimeError, ValueError, KeyError) as exc:
        raise CmrError(
            f"CMR granule search at {base} failed ({_reason(exc)}) after up to "
            f"{retry.attempts} attempts per request; query: {search.describe()}"
        ) from None
    finally:
        query.session.close()
    return [{"meta": g["meta"], "umm": g["umm"]} for g in granules]


class _TimeoutAdapter(HTTPAdapter):
    """An adapter that gives every request a timeout (requests has no session default)."""

    def __init__(self, timeout: float, **kwargs: Any):
        self.timeout = timeout
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


def _session(policy: RetryPolicy) -> requests.Session:
    retries = Retry(
        total=policy.attempts - 1,
        backoff_factor=policy.backoff_s,
        backoff_max=policy.max_backoff_s,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = _TimeoutAdapter(policy.timeout_s, max_retries=retries)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _reason(exc: BaseException) -> str:
    """A short cause: the HTTP status and CMR's error text, or the network failure."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        inner = exc.args[0] if exc.args else exc
        return f"connection failed: {getattr(inner, 'reason', inner)}"[:300]
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    if isinstance(cause, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"
