"""The granule catalog: which ATL06 granules touch which parent cells (DESIGN §2.2).

Building one takes three steps, each in its own module: a CMR search for the
cycle's padded dates over the region's bounding box (:mod:`magg_core.cmr`),
exact cycle membership from each granule's name (:mod:`magg_core.cycles`),
and the cells each footprint touches (:mod:`magg_core.footprints`), kept
where they cover the region (:mod:`magg_core.regions`). Granules whose
footprint is missing or unusable are listed in the catalog's report instead
of vanishing.

The file is JSON: ``metadata``; ``cells``, parent morton words as decimal
strings (JSON numbers lose uint64 precision) in ascending order — the order
of the store's chunks — each listing its granules with both URLs;
``granule_counts`` per cell; and the ``report``. A content fingerprint over
the cells (not the creation time) tells two catalogs with the same granules
apart from different ones, and catches a file edited or cut short. Files are
written atomically, so a failed run never leaves half a catalog.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from magg_core import __version__
from magg_core.cmr import GranuleSearch, RetryPolicy, search_granules
from magg_core.cmr import cmr_url as resolve_cmr_url
from magg_core.cycles import (
    CycleError,
    TimeRange,
    cycle_query_range,
    date_range,
    parse_granule_name,
)
from magg_core.footprints import FootprintError, footprint_cells
from magg_core.regions import Region, load_region

log = logging.getLogger(__name__)

FORMAT = 1

Problem = Literal["missing_footprint", "degenerate_footprint", "no_s3_url", "unrecognised_name"]


class CatalogError(ValueError):
    """A catalog that cannot be built or read; the message says why."""


@dataclass(frozen=True)
class CatalogGranule:
    """One granule as a cell worker needs it: its name and where to read it."""

    name: str
    s3: str
    https: str | None


@dataclass(frozen=True)
class ReportEntry:
    """A granule CMR returned that the catalog could not place in cells, and why."""

    name: str
    problem: Problem
    detail: str


@dataclass(frozen=True)
class Catalog:
    """Parent cells (ascending uint64 morton words) → the granules touching each."""

    metadata: Mapping[str, Any]
    cells: Mapping[int, tuple[CatalogGranule, ...]]
    report: tuple[ReportEntry, ...] = ()

    @property
    def parents(self) -> np.ndarray:
        """The parent cells, ascending, as ``uint64`` (the store's chunk order)."""
        return np.array(sorted(self.cells), dtype=np.uint64)

    def urls(self, parent: int, scheme: Literal["s3", "https"] = "s3") -> list[str]:
        """The granule URLs of one parent cell, in name (acquisition) order."""
        values = (g.s3 if scheme == "s3" else g.https for g in self.cells[int(parent)])
        return [url for url in values if url]

    @property
    def granule_count(self) -> int:
        return len({g.name for granules in self.cells.values() for g in granules})

    @property
    def is_empty(self) -> bool:
        """True when no granule touches the region: nothing to run."""
        return not self.cells

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the parent order and every cell's granules (names and URLs)."""
        content = {
            "parent_order": self.metadata.get("parent_order"),
            "cells": [
                [str(cell), [[g.name, g.s3, g.https] for g in self.cells[cell]]]
                for cell in sorted(self.cells)
            ],
        }
        canonical = json.dumps(content, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.cells)
        return {
            "metadata": {**self.metadata, "fingerprint": self.fingerprint},
            "cells": {
                str(cell): [
                    {"name": g.name, "s3": g.s3, "https": g.https} for g in self.cells[cell]
                ]
                for cell in ordered
            },
            "granule_counts": {str(cell): len(self.cells[cell]) for cell in ordered},
            "report": [
                {"name": r.name, "problem": r.problem, "detail": r.detail} for r in self.report
            ],
        }

    def write(self, path: str | Path) -> Path:
        """Write the catalog as JSON, atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, separators=(",", ":"))
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def load_catalog(path: str | Path) -> Catalog:
    """Read and check a catalog file written by :meth:`Catalog.write`.

    Raises
    ------
    CatalogError
        If the file is unreadable or not JSON, a field is missing or of the
        wrong type, cells are not ascending uint64 words, or the content no
        longer matches its fingerprint.
    """
    where = f"catalog {str(path)!r}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CatalogError(f"cannot read {where}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{where} is not JSON (truncated?): {exc}") from exc
    return catalog_from_dict(data, where=where)


def catalog_from_dict(data: Any, *, where: str = "catalog") -> Catalog:
    """The inverse of :meth:`Catalog.to_dict`, with the same checks as :func:`load_catalog`."""
    if not isinstance(data, Mapping):
        raise CatalogError(f"{where}: expected a JSON object at the top level")
    metadata, raw_cells = data.get("metadata"), data.get("cells")
    if not isinstance(metadata, Mapping) or not isinstance(raw_cells, Mapping):
        raise CatalogError(f"{where}: 'metadata' and 'cells' must both be objects")
    cells: dict[int, tuple[CatalogGranule, ...]] = {}
    previous = -1
    for key, granules in raw_cells.items():
        if not key.isdigit() or not 0 <= int(key) < 2**64:
            raise CatalogError(f"{where}: cell key {key!r} is not a uint64 morton word in decimal")
        if int(key) <= previous:
            raise CatalogError(f"{where}: cells are not in ascending morton order at {key}")
        previous = int(key)
        if not isinstance(granules, list):
            raise CatalogError(f"{where}: cells[{key}] must be a list of granules")
        cells[int(key)] = tuple(_granule(g, f"{where}: cells[{key}]") for g in granules)
    report = []
    for i, entry in enumerate(data.get("report") or []):
        try:
            report.append(
                ReportEntry(name=entry["name"], problem=entry["problem"], detail=entry["detail"])
            )
        except (TypeError, KeyError) as exc:
            raise CatalogError(f"{where}: report[{i}] needs name, problem and detail") from exc
    stated = metadata.get("fingerprint")
    catalog = Catalog(
        metadata={k: v for k, v in metadata.items() if k != "fingerprint"},
        cells=cells,
        report=tuple(report),
    )
    if stated != catalog.fingerprint:
        raise CatalogError(
            f"{where}: content does not match its fingerprint (edited or damaged); rebuild it"
        )
    return catalog


def _granule(raw: Any, where: str) -> CatalogGranule:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise CatalogError(f"{where}: each granule needs a name")
    s3, https = raw.get("s3"), raw.get("https")
    if not isinstance(s3, str) or not s3 or not (https is None or isinstance(https, str)):
        raise CatalogError(
            f"{where}: granule {raw['name']!r} needs an s3 URL (and https URL or null)"
        )
    return CatalogGranule(name=raw["name"], s3=s3, https=https)


def build_catalog(
    *,
    cycle: int | None = None,
    start: date | datetime | str | None = None,
    end: date | datetime | str | None = None,
    region: str | Path | Region = "antarctica",
    parent_order: int = 6,
    short_name: str = "ATL06",
    version: str = "007",
    provider: str = "NSIDC_CPRD",
    cmr_url: str | None = None,
    retry: RetryPolicy | None = None,
) -> Catalog:
    """Query CMR and build the catalog of one cycle, or of a date range, over a region.

    Parameters
    ----------
    cycle
        ICESat-2 cycle: CMR is asked for its padded dates and only granules
        whose name carries this cycle are kept. Give either this or both
        ``start`` and ``end`` (an end date alone is inclusive).
    region
        A built-in region name, a GeoJSON path, or a :class:`Region`.
    parent_order
        HEALPix order of the catalog's cells.
    cmr_url
        CMR's search root; ``$MAGG_CMR_URL`` or production when ``None``.
    retry
        Timeout and retry budget per CMR request (:class:`~magg_core.cmr.RetryPolicy`).

    Raises
    ------
    CycleError, RegionError, CatalogError
        For bad input, before anything is asked of CMR.
    CmrError
        When CMR keeps failing.
    """
    _check_order(parent_order)
    time_range = _time_range(cycle, start, end)
    region = region if isinstance(region, Region) else load_region(region)
    search = GranuleSearch(
        short_name=short_name,
        version=version,
        provider=provider,
        time_range=time_range,
        bounding_box=region.bounding_box(),
    )
    url = resolve_cmr_url(cmr_url)
    records = search_granules(search, url=url, retry=retry or RetryPolicy())
    log.info("CMR returned %d granule records for %s", len(records), search.describe())
    return catalog_from_records(
        records,
        region=region,
        parent_order=parent_order,
        cycle=cycle,
        search=search,
        source={"cmr_url": url, **search.to_dict()},
    )


def catalog_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    region: str | Path | Region = "antarctica",
    parent_order: int = 6,
    cycle: int | None = None,
    search: GranuleSearch | None = None,
    source: Mapping[str, Any] | None = None,
) -> Catalog:
    """Build a catalog from UMM-G records already at hand (no CMR request).

    The same placement as :func:`build_catalog`: with ``cycle``, only
    granules whose name carries it; each footprint's cells within the
    region; problems in the report.

    Parameters
    ----------
    records
        CMR search items ``{"meta": …, "umm": …}`` (as ``granules.umm_json``
        pages and :func:`magg_core.sample.write_sample` give them).
    search
        What the records answer, for the metadata; ATL06/007/NSIDC_CPRD
        with no dates when ``None``.
    source
        Recorded as the metadata's ``query``; ``{"source": "records"}`` by default.
    """
    _check_order(parent_order)
    region = region if isinstance(region, Region) else load_region(region)
    search = search or GranuleSearch()
    region_cells = region.cells(parent_order)
    by_cell: dict[int, list[CatalogGranule]] = defaultdict(list)
    report: list[ReportEntry] = []
    counts = {"records": 0, "duplicates": 0, "other_cycle": 0, "outside_region": 0}
    seen: set[str] = set()
    for item in records:
        counts["records"] += 1
        umm = item.get("umm") or {}
        name = umm.get("GranuleUR") or (item.get("meta") or {}).get("native-id") or "?"
        if name in seen:
            counts["duplicates"] += 1
            continue
        seen.add(name)
        if cycle is not None:
            parsed = parse_granule_name(name)
            if parsed is None:
                report.append(
                    ReportEntry(name, "unrecognised_name", "cannot tell its cycle from the name")
                )
                continue
            if parsed.cycle != cycle:
                counts["other_cycle"] += 1
                continue
        s3, https = _data_urls(umm, name)
        if s3 is None:
            report.append(
                ReportEntry(name, "no_s3_url", "no 'GET DATA VIA DIRECT ACCESS' s3:// URL")
            )
            continue
        try:
            cells = footprint_cells(umm, parent_order)
        except FootprintError as exc:
            report.append(ReportEntry(name, exc.problem, exc.detail))
            continue
        inside = np.intersect1d(cells, region_cells, assume_unique=True)
        if inside.size == 0:
            counts["outside_region"] += 1
            continue
        granule = CatalogGranule(name=name, s3=s3, https=https)
        for cell in inside.tolist():
            by_cell[cell].append(granule)
    cells = {cell: tuple(sorted(by_cell[cell], key=lambda g: g.name)) for cell in sorted(by_cell)}
    granules = {g.name for gs in cells.values() for g in gs}
    time_range = search.time_range
    metadata = {
        "format": FORMAT,
        "short_name": search.short_name,
        "version": search.version,
        "provider": search.provider,
        "cycle": cycle,
        "start": time_range.isoformat()[0] if time_range else None,
        "end": time_range.isoformat()[1] if time_range else None,
        "region": region.name,
        "parent_order": parent_order,
        "counts": {
            **counts,
            "granules": len(granules),
            "cells": len(cells),
            "region_cells": int(region_cells.size),
            "pairs": sum(len(gs) for gs in cells.values()),
            "reported": len(report),
        },
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "magg_version": __version__,
        "query": dict(source) if source is not None else {"source": "records"},
    }
    log.info(
        "catalog: %d granules in %d of %d region cells; %d reported",
        len(granules),
        len(cells),
        region_cells.size,
        len(report),
    )
    return Catalog(metadata=metadata, cells=cells, report=tuple(report))


def _time_range(
    cycle: int | None, start: date | datetime | str | None, end: date | datetime | str | None
) -> TimeRange:
    if cycle is not None:
        if start is not None or end is not None:
            raise CycleError("give either a cycle or start/end dates, not both")
        return cycle_query_range(cycle)
    if start is None or end is None:
        raise CycleError("give a cycle, or both a start and an end date")
    return date_range(start, end)


def _check_order(order: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 29:
        raise CatalogError(f"parent_order must be an integer in 1..29, got {order!r}")


def _data_urls(umm: Mapping[str, Any], name: str) -> tuple[str | None, str | None]:
    """The granule's ``s3://`` and ``https://`` data URLs, preferring those ending in its name."""

    def pick(kind: str, scheme: str) -> str | None:
        urls = [
            u.get("URL")
            for u in umm.get("RelatedUrls") or []
            if isinstance(u, Mapping)
            and u.get("Type") == kind
            and str(u.get("URL", "")).startswith(scheme)
        ]
        exact = [u for u in urls if u.rsplit("/", 1)[-1] == name]
        return (exact or urls or [None])[0]

    return pick("GET DATA VIA DIRECT ACCESS", "s3://"), pick("GET DATA", "https://")
