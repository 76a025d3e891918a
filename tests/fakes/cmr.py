"""A loopback fake of CMR granule search (``/search/granules.umm_json``).

It speaks the parts of CMR's wire format that magg's client relies on, so
python-cmr/earthaccess run unchanged with only the base URL swapped:

- query parameters as python-cmr sends them: ``short_name``, ``version``,
  ``provider``, ``temporal[]=start,end``, ``bounding_box=W,S,E,N`` (``W > E``
  crosses the antimeridian) and ``page_size`` (0–2000);
- a body ``{"hits", "took", "items": [{"meta", "umm"}, …]}`` with the
  ``CMR-Hits``, ``CMR-Took`` and ``CMR-Request-Id`` headers;
- deep paging with ``CMR-Search-After``: every page with results carries an
  opaque token, and the next page is served only to a request that sends it
  back (``page_num`` is not honoured, as CMR no longer does for deep paging);
- errors as CMR returns them: ``{"errors": [...]}`` with 400 for bad
  parameters.

Three departures from a perfect CMR can be switched on: short pages in the
middle of a result (``page_limit``: fewer records than ``page_size`` asked,
still with a token, and the pages after it), and a ``CMR-Hits`` count larger
than what is ever served (``unserved_hits``), both seen from the real one;
and pages that overlap (``overlap``: the second page starts again with the
last records of the first, as a result that shifts while it is paged does).

Spatial filtering keeps a granule when a footprint vertex lies in the box, a
stand-in for CMR's exact spherical intersection that is good enough for
region-sized boxes. Faults can be injected per request: an HTTP status (429
with ``Retry-After``, 500, …), a dropped connection, or a stall.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.fakes.loopback import send_json, serve_on_loopback, shut_down

MAX_PAGE_SIZE = 2000
SEARCH_PATH = "/search/granules.umm_json"
CMR_CONTENT_TYPE = "application/vnd.nasa.cmr.umm_results+json;version=1.6.6"


@dataclass(frozen=True)
class Fault:
    """What to do instead of answering one request."""

    status: int | None = None
    retry_after: float | None = None
    drop: bool = False
    stall_s: float = 0.0


@dataclass
class SeenRequest:
    path: str
    params: list[tuple[str, str]]
    search_after: str | None
    answered: int | str
    """HTTP status, ``"dropped"``, or ``"pending"`` while a stalled request waits."""
    fault: Fault | None = None


@dataclass
class FakeCmr:
    """Serves ``items`` (UMM-G search items) on ``http://127.0.0.1:<port>/search/``."""

    items: list[dict[str, Any]] = field(default_factory=list)
    page_limit: int | None = None
    """Serve at most this many records per page, whatever ``page_size`` asks."""
    unserved_hits: int = 0
    """Records counted in ``CMR-Hits`` that no page ever serves."""
    overlap: int = 0
    """Records of the first page that the second page serves again, first."""
    requests: list[SeenRequest] = field(default_factory=list)
    _faults: dict[int, Fault] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/search/"

    def start(self) -> FakeCmr:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                fake._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = serve_on_loopback(Handler)
        return self

    def stop(self) -> None:
        shut_down(self._server)

    def inject(self, fault: Fault, times: int = 1, after: int = 0) -> None:
        """Answer ``times`` requests with ``fault``, starting ``after`` requests from now."""
        with self._lock:
            first = len(self.requests) + after
            self._faults.update({first + i: fault for i in range(times)})

    def search_requests(self, *, with_results: bool = True) -> list[SeenRequest]:
        """Requests answered 200 (optionally only those asking for results, not hits)."""
        return [
            r
            for r in self.requests
            if r.answered == 200 and (not with_results or dict(r.params).get("page_size") != "0")
        ]

    # --- serving ---------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        params = parse_qsl(url.query, keep_blank_values=True)
        token = h.headers.get("CMR-Search-After")
        seen = SeenRequest(url.path, params, token, answered="pending")
        with self._lock:
            fault = seen.fault = self._faults.pop(len(self.requests), None)
            self.requests.append(seen)
        if fault is not None:
            if fault.stall_s:
                time.sleep(fault.stall_s)
            if fault.drop:
                seen.answered = "dropped"
                h.close_connection = True
                h.connection.shutdown(2)
                return
            if fault.status is not None:
                seen.answered = fault.status
                headers = (
                    {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
                )
                send_json(
                    h,
                    fault.status,
                    {"errors": [f"injected fault {fault.status}"]},
                    headers,
                    CMR_CONTENT_TYPE,
                )
                return
        if url.path != SEARCH_PATH:
            seen.answered = 404
            send_json(
                h,
                404,
                {"errors": [f"The resource {url.path} was not found"]},
                None,
                CMR_CONTENT_TYPE,
            )
            return
        try:
            status, body, headers = self._search(params, token)
        except ValueError as exc:
            status, body, headers = 400, {"errors": [str(exc)]}, {}
        seen.answered = status
        send_json(h, status, body, headers, CMR_CONTENT_TYPE)

    def _search(self, params: list[tuple[str, str]], token: str | None) -> tuple[int, dict, dict]:
        started = time.perf_counter()
        query = dict(params)
        page_size = int(query.get("page_size", "10"))
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be a number between 0 and {MAX_PAGE_SIZE}")
        matches = [item for item in self.items if _matches(item, params)]
        start = number = 0
        if token is not None:
            try:
                name, index, number = json.loads(token)
                start = int(index) + 1
                if matches[int(index)]["umm"]["GranuleUR"] != name:
                    raise ValueError
            except (ValueError, TypeError, IndexError, KeyError) as exc:
                raise ValueError(f"Invalid CMR-Search-After header value: {token}") from exc
            if number == 1:
                start = max(0, start - self.overlap)
        served = page_size if self.page_limit is None else min(page_size, self.page_limit)
        page = matches[start : start + served]
        hits = len(matches) + self.unserved_hits
        headers = {
            "CMR-Hits": str(hits),
            "CMR-Took": str(int((time.perf_counter() - started) * 1000)),
            "CMR-Request-Id": str(uuid.uuid4()),
        }
        if page:
            last = start + len(page) - 1
            headers["CMR-Search-After"] = json.dumps(
                [page[-1]["umm"]["GranuleUR"], last, number + 1]
            )
        return 200, {"hits": hits, "took": int(headers["CMR-Took"]), "items": page}, headers


def umm_item(
    name: str,
    ring: list[tuple[float, float]] | None,
    begin: datetime,
    end: datetime,
    *,
    short_name: str = "ATL06",
    version: str = "007",
    provider: str = "NSIDC_CPRD",
) -> dict[str, Any]:
    """A minimal UMM-G search item in NSIDC's shape; ``ring`` is ``(lon, lat)`` vertices."""
    path = f"ATLAS/{short_name}/{version}/{begin:%Y/%m/%d}/{name}"
    geometry = (
        {}
        if ring is None
        else {
            "GPolygons": [
                {"Boundary": {"Points": [{"Longitude": lo, "Latitude": la} for lo, la in ring]}}
            ]
        }
    )
    iso = "%Y-%m-%dT%H:%M:%S.000Z"
    return {
        "meta": {
            "concept-id": f"G{zlib.crc32(name.encode()):010d}-{provider}",
            "provider-id": provider,
            "native-id": name,
        },
        "umm": {
            "GranuleUR": name,
            "CollectionReference": {"ShortName": short_name, "Version": version},
            "TemporalExtent": {
                "RangeDateTime": {
                    "BeginningDateTime": begin.strftime(iso),
                    "EndingDateTime": end.strftime(iso),
                }
            },
            "SpatialExtent": {"HorizontalSpatialDomain": {"Geometry": geometry}},
            "RelatedUrls": [
                {
                    "URL": f"s3://nsidc-cumulus-prod-protected/{path}",
                    "Type": "GET DATA VIA DIRECT ACCESS",
                },
                {
                    "URL": f"https://data.nsidc.earthdatacloud.nasa.gov/nsidc-cumulus-prod-protected/{path}",
                    "Type": "GET DATA",
                },
            ],
        },
    }


def revision_of(item: dict[str, Any], revision: str) -> dict[str, Any]:
    """The record of another revision (``"02"``…) of the same acquisition as ``item``.

    Name, native id and URLs end in the new revision; the concept id is the
    new record's own, as CMR gives each revision.
    """
    old = item["umm"]["GranuleUR"]
    new = f"{old[: -len('01.h5')]}{revision}.h5"
    record = json.loads(json.dumps(item).replace(old, new))
    record["meta"]["concept-id"] = (
        f"G{zlib.crc32(new.encode()):010d}-{record['meta']['provider-id']}"
    )
    return record


ENTRY_TITLES = {"ATLAS/ICESat-2 L3A Land Ice Height V005": ("ATL06", "005")}
"""Collections that real records name by ``EntryTitle`` alone (UMM-G allows either that or
``ShortName`` + ``Version``): NSIDC_ECS's ATL06 V005, C2144439155-NSIDC_ECS (its
``dataset_id`` in the ECHO feed of ``tests/data/realdata/cmr/earthaccess_atl06.json``)."""


def _collection(umm: dict[str, Any]) -> tuple[str | None, str | None]:
    """The ``(short name, version)`` of the collection a record belongs to."""
    reference = umm["CollectionReference"]
    if "EntryTitle" in reference:
        return ENTRY_TITLES.get(reference["EntryTitle"], (None, None))
    return reference["ShortName"], reference["Version"]


def _matches(item: dict[str, Any], params: list[tuple[str, str]]) -> bool:
    umm, meta = item["umm"], item["meta"]
    short_name, version = _collection(umm)
    for key, value in params:
        if key == "short_name" and short_name != value:
            return False
        if key == "version" and version != value:
            return False
        if key == "provider" and meta["provider-id"] != value:
            return False
        if key == "temporal[]" and not _overlaps_time(umm, value):
            return False
        if key == "bounding_box" and not _in_box(umm, value):
            return False
    return True


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _overlaps_time(umm: dict[str, Any], value: str) -> bool:
    lo, _, hi = value.partition(",")
    span = umm["TemporalExtent"]["RangeDateTime"]
    begin, end = _parse_time(span["BeginningDateTime"]), _parse_time(span["EndingDateTime"])
    return (not lo or end >= _parse_time(lo)) and (not hi or begin <= _parse_time(hi))


def _in_box(umm: dict[str, Any], value: str) -> bool:
    west, south, east, north = (float(v) for v in value.split(","))
    geometry = umm.get("SpatialExtent", {}).get("HorizontalSpatialDomain", {}).get("Geometry", {})
    for polygon in geometry.get("GPolygons") or []:
        for point in polygon["Boundary"]["Points"]:
            lat, lon = point["Latitude"], point["Longitude"]
            in_lon = west <= lon <= east if west <= east else (lon >= west or lon <= east)
            if south <= lat <= north and in_lon:
                return True
    # Granules without a footprint cannot be placed; CMR matches them by other
    # spatial metadata, so keep them (the catalog must report them).
    return not geometry.get("GPolygons")
