"""Granule search in NASA's CMR, with a timeout, bounded retries and a complete count.

The query is built by python-cmr's ``GranuleQuery`` (parameter checks and
encoding); the pages are fetched here. earthaccess's ``DataGranules.get_all()``
ends the query at the first page shorter than the page size, and python-cmr's
``get_all()`` counts every page as full: either turns a short page in the
middle of a result (4 of 6 granules) into a silently shorter catalog. So
:func:`search_granules` keeps paging while CMR returns a ``CMR-Search-After``
token and the records received fall short of ``CMR-Hits``, and ends with a
:class:`CmrError` naming hits against received when the two disagree; a
record served twice (pages that overlap) is kept once and not counted twice.

Every request goes through one ``requests`` session: each request times out,
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from cmr import CMR_OPS, GranuleQuery
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from magg_core.cycles import TimeRange
from magg_core.errors import PermanentError

CMR_URL_ENV = "MAGG_CMR_URL"
RETRY_STATUSES = (429, 500, 502, 503, 504)
PAGE_SIZE = 2000
"""CMR's largest page."""


DATA_URL_TYPES = frozenset({"GET DATA", "GET DATA VIA DIRECT ACCESS"})
"""``RelatedUrls`` types that point at the granule's file itself (UMM-G). Which of
them holds the ``s3://`` URL varies: NSIDC_CPRD records listed it under
``GET DATA`` in 2021 (ATL03 V004, the Openscapes cookbook's
``ICESat2-CMR-OnPrem-vs-Cloud`` notebook), so a link is told by its scheme, as
earthaccess's ``DataGranule`` falls back to doing, not by its type alone."""


class CmrError(PermanentError, RuntimeError):
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
        When a request still fails after ``retry.attempts`` tries, CMR
        rejects the query outright (e.g. HTTP 400), answers without
        ``CMR-Hits`` or with a body that is not a UMM-JSON page (a record
        without ``meta.concept-id`` included), or the distinct records
        received differ in number from ``CMR-Hits`` (CMR's own count of the
        result, documented in its search API).
    """
    base = cmr_url(url)
    query = GranuleQuery(mode=base).format("umm_json")
    query.short_name(search.short_name).version(search.version).provider(search.provider)
    if search.time_range is not None:
        query.temporal(search.time_range.start, search.time_range.end)
    if search.bounding_box is not None:
        query.bounding_box(*search.bounding_box)
    where = f"CMR granule search at {base}"
    session = _session(retry)
    try:
        # python-cmr has no public way to get the URL it would ask; earthaccess
        # pages over ``_build_url()`` the same way.
        return _all_pages(session, query._build_url(), dict(query.headers), where, search)
    except requests.RequestException as exc:
        raise CmrError(
            f"{where} failed ({_reason(exc)}) after up to {retry.attempts} attempts per "
            f"request; query: {search.describe()}"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CmrError(
            f"{where} gave an answer that is not a UMM-JSON page ({_reason(exc)}); "
            f"query: {search.describe()}"
        ) from None
    finally:
        session.close()


def _all_pages(
    session: requests.Session,
    url: str,
    headers: dict[str, str],
    where: str,
    search: GranuleSearch,
) -> list[dict[str, Any]]:
    """Every page of one query: follow ``CMR-Search-After`` until ``CMR-Hits`` records arrived.

    A short page does not end the query (CMR may serve one mid-result); a
    page with no records or no token does. ``CMR-Hits`` is read from every
    page, so a result that grows while it is paged is still followed to its end.

    Records are told apart by ``meta.concept-id`` (CMR's identifier of a
    granule record) and each is kept once: pages that overlap (a record
    served again on the next page) must neither grid a granule twice nor,
    by filling the count, hide a record that was never served. So it is the
    *distinct* records that must reach ``CMR-Hits``.
    """
    items: dict[str, dict[str, Any]] = {}
    repeated = 0
    while True:
        response = session.get(url, headers=headers, params={"page_size": PAGE_SIZE})
        response.raise_for_status()
        hits = _hits(response)
        page = [{"meta": item["meta"], "umm": item["umm"]} for item in response.json()["items"]]
        for item in page:
            concept = item["meta"]["concept-id"]
            if not isinstance(concept, str) or not concept:
                raise ValueError(f"a record's meta.concept-id is {concept!r}")
            repeated += concept in items
            items.setdefault(concept, item)
        token = response.headers.get("CMR-Search-After")
        if len(items) >= hits or not page or token is None:
            break
        headers["CMR-Search-After"] = token
    if len(items) != hits:
        again = f", and {repeated} repeats of records already received" if repeated else ""
        raise CmrError(
            f"{where}: CMR-Hits says {hits} granules but {len(items)} were received{again}; "
            f"a result that differs from CMR's own count is not used (search again). "
            f"Query: {search.describe()}"
        )
    return list(items.values())


def _hits(response: requests.Response) -> int:
    try:
        return int(response.headers["CMR-Hits"])
    except (KeyError, ValueError):
        raise ValueError(f"CMR-Hits header is {response.headers.get('CMR-Hits')!r}") from None


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
    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if isinstance(exc, KeyError):
        return f"no {exc} field"
    if isinstance(exc, ValueError):
        return str(exc)[:300]
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def record_granule_name(item: Mapping[str, Any]) -> str:
    """The granule's file name, wherever its CMR record keeps it (``"?"`` if nowhere).

    NSIDC_ECS records name a granule ``GranuleUR = "SC:ATL06.005:228825416"``
    and keep the file name only in ``DataGranule.Identifiers`` as the
    ``ProducerGranuleId`` (a real V005 record, ``tests/data/realdata/cmr``);
    cloud records use the file name as ``GranuleUR``. In order: the
    ``ProducerGranuleId``, the ``GranuleUR``, the ``native-id``. Revisions,
    duplicates, mirrors and cycles all work on this name; one that is not a
    plain file name is reported by the catalog, never used as a path.
    """
    umm = item.get("umm") or {}
    identifiers = (umm.get("DataGranule") or {}).get("Identifiers") or []
    for entry in identifiers:
        if isinstance(entry, Mapping) and entry.get("IdentifierType") == "ProducerGranuleId":
            if isinstance(entry.get("Identifier"), str) and entry["Identifier"]:
                return entry["Identifier"]
    return umm.get("GranuleUR") or (item.get("meta") or {}).get("native-id") or "?"


def data_urls(umm: Mapping[str, Any]) -> list[str]:
    """Every URL of a record's ``RelatedUrls`` that points at the file (:data:`DATA_URL_TYPES`)."""
    return [
        link["URL"]
        for link in umm.get("RelatedUrls") or []
        if isinstance(link, Mapping)
        and link.get("Type") in DATA_URL_TYPES
        and isinstance(link.get("URL"), str)
    ]
