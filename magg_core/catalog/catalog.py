"""The granule catalog: which ATL06 granules touch which parent cells.

The file's contract is docs/architecture.md §Catalog.

Building one takes three steps, each in its own module: a CMR search for the
cycle's padded dates over the region's bounding box (:mod:`magg_core.catalog.cmr`),
exact cycle membership from each granule's name (:mod:`magg_core.cycles`),
and the cells each footprint touches (:mod:`magg_core.catalog.footprints`), kept
where they cover the region (:mod:`magg_core.catalog.regions`). Granules whose
footprint is missing or unusable are listed in the catalog's report instead
of vanishing.

Each granule is gridded once: a cell worker sums whatever it is given, so a
granule listed twice would double its counts and shrink ``h_sigma`` by √2. CMR
can list one granule under two providers (one record without an ``s3://`` URL)
and one acquisition as two revisions (``…_007_01`` and ``…_007_02``, docs/architecture.md
§Catalog), and a records list may hold two releases of it (``…_006_01`` and
``…_007_01``). A granule's name is its *file* name, wherever the record keeps
it (:func:`magg_core.catalog.cmr.record_granule_name`: NSIDC_ECS records name it only
in ``DataGranule.Identifiers``). A catalog therefore keeps one record per
granule name — the one with an ``s3://`` URL, whatever the order CMR sent them
in — one granule per ``s3://`` object (however its URL is spelled:
``s3://b//k`` is ``s3://b/k``), only the release it was built for (the query's
version; other releases are reported as ``other_release``), and only the
highest revision of each acquisition (same product, start time, RGT, cycle and
region: :attr:`~magg_core.cycles.GranuleName.acquisition`); superseded
revisions are named in the report. Records of two releases of one acquisition
with no release chosen are refused.

The file is JSON: ``metadata``; ``cells``, parent morton words as decimal
strings (JSON numbers lose uint64 precision) in ascending order — the order
of the store's chunks — each listing its granules with both URLs;
``granule_counts`` per cell; and the ``report``. A content fingerprint over
the cells (not the creation time) tells two catalogs with the same granules
apart from different ones, and catches a file edited or cut short. Files are
written atomically, so a failed run never leaves half a catalog.

A catalog file is what a run grids, exactly, so reading one *rejects* what a
built catalog never holds rather than quietly repairing it (a repaired file
would grid something other than what it says, under a fingerprint that no
longer describes it): a cell key that is not a morton word of the catalog's
``parent_order``; a granule listed twice in a cell (by name, by its URL's
file name, or by URL however spelled); two revisions or releases of one
acquisition; a granule name that is not a plain file name;
and an ``s3`` URL that is not ``s3://bucket/key`` or an ``https`` URL that is
not ``https://host/…`` — an entry must never send a worker to a local file.
Each error names the cell and the granule; ``magg catalog`` rebuilds a clean file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from magg_core import __version__
from magg_core.catalog.cmr import (
    GranuleSearch,
    RetryPolicy,
    data_urls,
    record_granule_name,
    search_granules,
)
from magg_core.catalog.cmr import cmr_url as resolve_cmr_url
from magg_core.catalog.footprints import FootprintError, footprint_cells
from magg_core.catalog.regions import Region, load_region
from magg_core.cycles import (
    CycleError,
    GranuleName,
    TimeRange,
    cycle_query_range,
    date_range,
    granule_fields,
)
from magg_core.errors import InputError
from magg_core.morton import cell_word_problem
from magg_core.urls import URLError, granule_name, granule_url

log = logging.getLogger(__name__)

FORMAT = 1

Problem = Literal[
    "missing_footprint",
    "degenerate_footprint",
    "no_s3_url",
    "unrecognised_name",
    "superseded",
    "other_release",
]


class CatalogError(InputError, ValueError):
    """A catalog that cannot be built or read; the message says why."""


@dataclass(frozen=True)
class CatalogGranule:
    """One granule as a cell worker needs it: its name and where to read it."""

    name: str
    s3: str
    https: str | None


@dataclass(frozen=True)
class ReportEntry:
    """A granule CMR returned that the catalog does not place in cells, and why.

    Either it could not (no footprint, no ``s3://`` URL, a name that gives no
    cycle) or it must not: a ``superseded`` revision, whose acquisition is
    gridded from its highest revision only.
    """

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
    """The inverse of :meth:`Catalog.to_dict`, with the same checks as :func:`load_catalog`.

    Raises
    ------
    CatalogError
        Naming the cell and granule, for anything a run must not grid: see
        the module's description of what a catalog file may hold.
    """
    if not isinstance(data, Mapping):
        raise CatalogError(f"{where}: expected a JSON object at the top level")
    metadata, raw_cells = data.get("metadata"), data.get("cells")
    if not isinstance(metadata, Mapping) or not isinstance(raw_cells, Mapping):
        raise CatalogError(f"{where}: 'metadata' and 'cells' must both be objects")
    order = metadata.get("parent_order")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 29:
        raise CatalogError(
            f"{where}: metadata.parent_order must be an integer in 1..29, got {order!r}"
        )
    cells: dict[int, tuple[CatalogGranule, ...]] = {}
    previous = -1
    for key, granules in raw_cells.items():
        word = _cell_key(key, order, where)
        if word <= previous:
            raise CatalogError(f"{where}: cells are not in ascending morton order at {key}")
        previous = word
        if not isinstance(granules, list):
            raise CatalogError(f"{where}: cells[{key}] must be a list of granules")
        cells[word] = tuple(_granule(g, f"{where}: cells[{key}]") for g in granules)
    _check_each_granule_once(cells, where)
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


def _cell_key(key: Any, order: int, where: str) -> int:
    """A cell key (a decimal string) as a morton word of ``order``."""
    if not isinstance(key, str) or not (key.isascii() and key.isdigit()):
        raise CatalogError(f"{where}: cell key {key!r} is not a uint64 morton word in decimal")
    problem = cell_word_problem(int(key), order)
    if problem is not None:
        raise CatalogError(f"{where}: cell key {key} {problem}")
    return int(key)


def _granule(raw: Any, where: str) -> CatalogGranule:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise CatalogError(f"{where}: each granule needs a name")
    name, s3, https = raw["name"], raw.get("s3"), raw.get("https")
    if not _is_plain_name(name):
        raise CatalogError(f"{where}: granule name {name!r} is not a plain file name")
    if not _is_url(s3, "s3"):
        raise CatalogError(f"{where}: granule {name!r}: s3 URL {s3!r} is not s3://bucket/key")
    if https is not None and not _is_url(https, "https"):
        raise CatalogError(
            f"{where}: granule {name!r}: https URL {https!r} is not https://host/path (or null)"
        )
    return CatalogGranule(name=name, s3=s3, https=https)


def _is_plain_name(name: str) -> bool:
    """A file name with no directory part: a mirror path built from it stays in the mirror."""
    return bool(name) and name not in {".", ".."} and not any(c in name for c in "/\\\0")


def _is_url(value: Any, scheme: str) -> bool:
    """``scheme://host/path`` with a host and a non-empty path (never a local file)."""
    if not isinstance(value, str) or not value.startswith(f"{scheme}://"):
        return False
    parts = urlsplit(value)
    return bool(parts.netloc) and bool(parts.path.strip("/"))


def _check_each_granule_once(cells: Mapping[int, tuple[CatalogGranule, ...]], where: str) -> None:
    """Reject a granule twice in a cell, or two revisions or releases of one acquisition.

    A granule is the same when its name, its ``s3`` URL's file name or either
    URL in canonical form (:func:`_same_object`) repeats; an acquisition is
    the same across cells too, so one revision or release is gridded everywhere.
    """
    acquisitions: dict[tuple, tuple[str, int]] = {}
    for cell, granules in cells.items():
        seen: dict[str, str] = {}
        for g in granules:
            names = {g.name, granule_name(g.s3)}
            keys = [*names, *(_same_object(u) for u in (g.s3, g.https) if u is not None)]
            for key in keys:
                if key in seen:
                    raise CatalogError(
                        f"{where}: cells[{cell}] lists granule {g.name!r} twice "
                        f"({key!r}, also as granule {seen[key]!r})"
                    )
            seen.update(dict.fromkeys(keys, g.name))
            for name in sorted(names):
                parsed = granule_fields(name)
                if parsed is None:
                    continue
                first, first_cell = acquisitions.setdefault(parsed.acquisition, (name, cell))
                if first != name:
                    raise CatalogError(
                        f"{where}: cells[{cell}] granule {name!r} and cells[{first_cell}] "
                        f"granule {first!r} are two revisions or releases of one acquisition; "
                        "a catalog holds one of them (rebuild it with magg catalog)"
                    )


def _same_object(url: str) -> str:
    """A URL in the form two spellings of one object share: ``s3://`` canonical
    (:func:`magg_core.urls.granule_url`), any other as given."""
    try:
        return granule_url(url)
    except URLError:
        return url


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
        Timeout and retry budget per CMR request (:class:`~magg_core.catalog.cmr.RetryPolicy`).

    Raises
    ------
    CycleError, RegionError, CatalogError
        For bad input, before anything is asked of CMR.
    CmrError
        When CMR keeps failing.
    """
    _check_order(parent_order)
    time_range = query_time_range(cycle, start, end)
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

    The same placement as :func:`build_catalog`: one record per granule
    name (the one with an ``s3://`` URL), one granule per ``s3://`` object;
    with ``cycle``, only granules whose name carries it; with ``search``,
    only its release (``search.version``); of each acquisition only the
    highest revision; each footprint's cells within the region; problems,
    other releases and superseded revisions in the report.

    Parameters
    ----------
    records
        CMR search items ``{"meta": …, "umm": …}`` (as ``granules.umm_json``
        pages and :func:`magg_core.granules.sample.write_sample` give them).
    search
        What the records answer, for the metadata, and the release to keep;
        ATL06/007/NSIDC_CPRD with no dates, and every release, when ``None``
        (then records of two releases of one acquisition raise CatalogError).
    source
        Recorded as the metadata's ``query``; ``{"source": "records"}`` by default.
    """
    _check_order(parent_order)
    region = region if isinstance(region, Region) else load_region(region)
    release = None if search is None else search.version
    search = search or GranuleSearch()
    region_cells = region.cells(parent_order)
    by_cell: dict[int, list[CatalogGranule]] = defaultdict(list)
    report: list[ReportEntry] = []
    records = list(records)
    by_name = _one_record_per_name(records)
    counts = {
        "records": len(records),
        "duplicates": len(records) - len(by_name),
        "other_cycle": 0,
        "other_release": 0,
        "superseded": 0,
        "outside_region": 0,
    }
    newest = _granules_to_grid(by_name, cycle, release, counts, report)
    urls = {name: _data_urls(by_name[name], name) for name in newest}
    taken: set[str] = set()
    for name in sorted(newest, key=lambda n: (not _named_by_url(urls[n][0], n), n)):
        s3, https = urls[name]
        if s3 is None:
            report.append(ReportEntry(name, "no_s3_url", "no s3:// data URL"))
            continue
        if _same_object(s3) in taken:  # another name, or spelling, for the same file
            counts["duplicates"] += 1
            continue
        taken.add(_same_object(s3))
        try:
            cells = footprint_cells(by_name[name], parent_order)
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


def _granules_to_grid(
    by_name: Mapping[str, Any],
    cycle: int | None,
    release: str | None,
    counts: dict[str, int],
    report: list[ReportEntry],
) -> list[str]:
    """The names to place: plain file names, of ``cycle`` and ``release``, the highest
    revision of each acquisition.

    Counts the other cycles', other releases' and superseded granules in
    ``counts`` and adds unusable names, other releases and superseded
    revisions to ``report``.

    Raises
    ------
    CatalogError
        If, with no ``release`` chosen, two releases of one acquisition remain.
    """
    in_cycle = []
    for name in sorted(by_name):
        if not _is_plain_name(name):
            report.append(ReportEntry(name, "unrecognised_name", "not a plain file name"))
            continue
        parsed = granule_fields(name)
        if release is not None and parsed is not None and not _same_release(parsed, release):
            counts["other_release"] += 1
            report.append(
                ReportEntry(name, "other_release", f"release {parsed.version}, not {release}")
            )
            continue
        if cycle is not None:
            parsed = granule_fields(name)
            if parsed is None:
                report.append(
                    ReportEntry(name, "unrecognised_name", "cannot tell its cycle from the name")
                )
                continue
            if parsed.cycle != cycle:
                counts["other_cycle"] += 1
                continue
        in_cycle.append(name)
    newest, superseded = _highest_revisions(in_cycle)
    counts["superseded"] = len(superseded)
    report.extend(
        ReportEntry(old, "superseded", f"a later revision of the same acquisition, {new}, is used")
        for old, new in superseded
    )
    return newest


def _one_record_per_name(records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each granule name's ``umm``: of several records (two providers), the most usable one's.

    Chosen before duplicates are dropped, so the result does not depend on
    the order of the records: one with an ``s3://`` URL (ending in the name)
    and an ``https://`` URL wins, then the smallest by content.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for item in records:
        groups[record_granule_name(item)].append(item)
    chosen = {}
    for name, items in groups.items():
        best = items[0] if len(items) == 1 else min(items, key=_record_rank(name))
        chosen[name] = best.get("umm") or {}
    return chosen


def _record_rank(name: str) -> Callable[[Mapping[str, Any]], tuple]:
    """Sort key for one name's records: the most usable first, ties broken by content."""

    def rank(item: Mapping[str, Any]) -> tuple:
        s3, https = _data_urls(item.get("umm") or {}, name)
        content = json.dumps(item, sort_keys=True, default=str)
        return (s3 is None, not _named_by_url(s3, name), https is None, content)

    return rank


def _same_release(name: GranuleName, release: str) -> bool:
    """True if the name's release is ``release`` (CMR's ``Version``, e.g. ``"007"``).

    Compared as numbers when both are (``"7"`` is ``"007"``), else as text."""
    if name.version.isdigit() and release.isdigit():
        return int(name.version) == int(release)
    return name.version == release


def _named_by_url(url: str | None, name: str) -> bool:
    return url is not None and not url.endswith("/") and granule_name(url) == name


def _highest_revisions(names: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split granule names into the highest revision of each acquisition and the rest.

    Returns
    -------
    newest : list of str
        One name per acquisition; a name that does not parse is its own acquisition.
    superseded : list of (str, str)
        ``(older revision, the name that supersedes it)``.
    """
    groups: dict[Any, list[tuple[int, str]]] = defaultdict(list)
    for name in names:
        parsed = granule_fields(name)
        key = name if parsed is None else parsed.acquisition
        groups[key].append((-1 if parsed is None else int(parsed.revision), name))
    newest, superseded = [], []
    for revisions in groups.values():
        releases = {p.version for _, name in revisions if (p := granule_fields(name))}
        if len(releases) > 1:
            names = ", ".join(name for _, name in sorted(revisions, key=lambda r: r[1]))
            raise CatalogError(
                f"records hold releases {', '.join(sorted(releases))} of one acquisition "
                f"({names}): a catalog grids one; give the release to keep (the search's version)"
            )
        revisions.sort()
        latest = revisions[-1][1]
        newest.append(latest)
        superseded.extend((old, latest) for _, old in revisions[:-1])
    return newest, superseded


def query_time_range(
    cycle: int | None, start: date | datetime | str | None, end: date | datetime | str | None
) -> TimeRange:
    """The dates to ask CMR for: a cycle's (padded, see :mod:`magg_core.cycles`) or a range.

    Raises
    ------
    CycleError
        If neither or both of a cycle and a start/end pair are given, or as
        :func:`magg_core.cycles.cycle_query_range` and
        :func:`magg_core.cycles.date_range` do.
    """
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
    """The granule's ``s3://`` and ``https://`` data URLs, preferring those ending in its name.

    A URL is told by its scheme among the record's data links
    (:func:`magg_core.catalog.cmr.data_urls`), whichever type lists it. Only URLs a
    catalog file may hold (:func:`_is_url`) are picked, so a built catalog
    always loads.
    """
    links = data_urls(umm)

    def pick(scheme: str) -> str | None:
        urls = [u for u in links if _is_url(u, scheme)]
        exact = [u for u in urls if _named_by_url(u, name)]
        return (exact or urls or [None])[0]

    return pick("s3"), pick("https")
