"""ICESat-2 cycles: which dates to ask CMR for, and which granules really belong.

A cycle is the 91-day repeat of the 1,387 reference ground tracks. Its
calendar dates are only approximate, but every ATL06 file name carries its
cycle exactly (``ATL06_<yyyymmddhhmmss>_<tttt><cc><rr>_<vvv>_<nn>.h5``), so
a cycle's catalog asks CMR for a generously padded date range and then keeps
the granules whose *name* says they belong to that cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from magg_core.errors import InputError
from magg_core.urls import URLError, granule_name

CYCLE_DAYS = 91
"""Length of a repeat cycle (ICESat-2's exact 91-day repeat orbit; docs/architecture.md §Cycles)."""

RGTS_PER_CYCLE = 1387
"""Reference ground tracks per cycle: one per revolution, 1,387 revolutions in 91 days."""

CYCLE_1_START = datetime(2018, 9, 28, tzinfo=UTC)
"""Nominal start of cycle 1 (RGT 1).

Derived from real granule names: ``ATL06_20181014103720_02410111`` is RGT 241
of cycle 1 on 2018-10-14, and 240 revolutions of 91/1387 days each lead back
15.7 days; cycle 2 accordingly began on 2018-12-28. Science data only start
on 2018-10-13 (:data:`FIRST_DATA`), which is why that date is often quoted
as the start of cycle 1.
"""

ATLAS_EPOCH = datetime(2018, 1, 1, tzinfo=UTC)
"""The instant ATL06 ``delta_time`` counts from: 2018-01-01T00:00:00 UTC.

The ATL06 data dictionary calls ``delta_time`` "seconds since 2018-01-01"
(the ATLAS Standard Data Product epoch), and ``ancillary_data/
atlas_sdp_gps_epoch`` = 1198800018 s is that UTC instant expressed as GPS
seconds (GPS then ran 18 leap seconds ahead of UTC). Checked on real
granules: ``ancillary_data/data_start_utc`` equals this epoch plus
``ancillary_data/start_delta_time`` to the microsecond (release 003,
``2018-10-15T10:10:18.655715Z`` = epoch + 24833418.655715 s; release 209
likewise; ``tests/test_realdata.py``). No leap second has been added since
2017, so UTC is the epoch plus ``delta_time`` seconds exactly.
"""

FIRST_DATA = datetime(2018, 10, 13, tzinfo=UTC)
"""First ATLAS science data: nothing earlier can be in any catalog."""

QUERY_PAD = timedelta(days=16)
"""Padding on each side of a cycle's nominal dates in the CMR query.

It covers both conventions for where a cycle starts (RGT 1, or 15 days
later as when counting from the first data) plus any drift. The cost is
about a third more CMR records, which the exact name filter drops.
"""

_NAME = re.compile(
    r"^(?P<product>ATL\d{2})_(?P<start>\d{14})_(?P<rgt>\d{4})(?P<cycle>\d{2})(?P<region>\d{2})"
    r"_(?P<version>\d{3})_(?P<revision>\d{2})\.h5$"
)


class CycleError(InputError, ValueError):
    """A cycle or date range that cannot be queried; the message says why."""


class GranuleNameError(InputError, ValueError):
    """A file name that is not an ICESat-2 granule's; the message quotes it."""


@dataclass(frozen=True)
class TimeRange:
    """A half-open UTC interval ``[start, end)``."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise CycleError("time range bounds must be timezone-aware (UTC)")
        if self.end <= self.start:
            raise CycleError(f"end {self.end:%Y-%m-%d} is not after start {self.start:%Y-%m-%d}")

    def isoformat(self) -> tuple[str, str]:
        """Both bounds as ``YYYY-MM-DDTHH:MM:SSZ``, the form CMR and the catalog use."""
        return tuple(
            t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for t in (self.start, self.end)
        )


@dataclass(frozen=True)
class GranuleName:
    """The fields of an ICESat-2 ATL0x granule file name."""

    product: str
    start: datetime
    rgt: int
    cycle: int
    region: int
    version: str
    revision: str

    @property
    def acquisition(self) -> tuple[str, datetime, int, int, int]:
        """What every revision and release of one acquisition share: every field but those two.

        A reference ground track is flown once per cycle, and each region of it
        is one granule, so product, RGT, cycle and region name the
        acquisition; its start time is the same in every release (NSIDC_CPRD
        holds ``ATL03_20250104003608_02892602_006_01.h5`` and ``…_007_01.h5``:
        ``realdata/cmr/earthaccess_fsspec_nb_atl03_cprd_reprs.json``).
        """
        return (self.product, self.start, self.rgt, self.cycle, self.region)


def delta_time_utc(delta_time: float) -> datetime:
    """The UTC instant of an ATL06 ``delta_time`` (seconds since :data:`ATLAS_EPOCH`)."""
    return ATLAS_EPOCH + timedelta(seconds=float(delta_time))


def parse_granule_name(name: str) -> GranuleName:
    """Split a granule file name into its fields: the one parser of granule names.

    ``ATL06_<yyyymmddhhmmss>_<tttt><cc><rr>_<vvv>_<nn>.h5``: product, start of
    the acquisition (UTC), RGT, cycle, region, release and revision, as NSIDC
    names ICESat-2 granules (docs/architecture.md §Granule names). A URL or
    path is accepted too: its file name (:func:`magg_core.urls.granule_name`)
    is parsed, so ``s3://…/ATL06_….h5`` works.

    Raises
    ------
    GranuleNameError
        If the file name is not such a name (another product's, a subset's
        ``processed_ATL06_…``, an impossible date); the message quotes it.
    """
    try:
        file_name = granule_name(name)
    except URLError as exc:
        raise GranuleNameError(f"not a granule name: {exc}") from None
    match = _NAME.match(file_name)
    start = None
    if match is not None:
        try:
            start = datetime.strptime(match["start"], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            start = None
    if match is None or start is None:
        raise GranuleNameError(
            f"{file_name[:200]!r} is not an ICESat-2 granule name "
            "(ATLnn_<yyyymmddhhmmss>_<rgt><cycle><region>_<release>_<revision>.h5)"
        )
    return GranuleName(
        product=match["product"],
        start=start,
        rgt=int(match["rgt"]),
        cycle=int(match["cycle"]),
        region=int(match["region"]),
        version=match["version"],
        revision=match["revision"],
    )


def granule_fields(name: str) -> GranuleName | None:
    """:func:`parse_granule_name`, or ``None`` for a name that is not a granule's.

    For callers that meet other files by design (a catalog's subsets, CMR
    records of another naming) and set them aside instead of failing.
    """
    try:
        return parse_granule_name(name)
    except GranuleNameError:
        return None


def cycle_range(cycle: int) -> TimeRange:
    """The nominal dates of a cycle (approximate; see :data:`CYCLE_1_START`).

    Raises
    ------
    CycleError
        For a cycle number below 1: there was no cycle before launch.
    """
    if isinstance(cycle, bool) or not isinstance(cycle, int):
        raise CycleError(f"cycle must be an integer, got {cycle!r}")
    if cycle < 1:
        raise CycleError(
            f"cycle {cycle} is before launch: ICESat-2 cycles start at 1 "
            f"({CYCLE_1_START:%Y-%m-%d}, first data {FIRST_DATA:%Y-%m-%d})"
        )
    start = CYCLE_1_START + timedelta(days=CYCLE_DAYS * (cycle - 1))
    return TimeRange(start, start + timedelta(days=CYCLE_DAYS))


def cycle_query_range(cycle: int) -> TimeRange:
    """The padded date range to ask CMR for, so that no granule of ``cycle`` is missed."""
    nominal = cycle_range(cycle)
    return TimeRange(max(nominal.start - QUERY_PAD, FIRST_DATA), nominal.end + QUERY_PAD)


def date_range(start: date | datetime | str, end: date | datetime | str) -> TimeRange:
    """A user's ``--start-date``/``--end-date`` as a UTC range; a plain end date is inclusive.

    Raises
    ------
    CycleError
        If a date does not parse, the end precedes the start, or the whole
        range lies before the first ICESat-2 data.
    """
    lo = _as_datetime(start, "start")
    hi = _as_datetime(end, "end")
    if _is_plain_date(end):
        hi += timedelta(days=1)
    if hi <= FIRST_DATA:
        raise CycleError(
            f"date range ending {hi:%Y-%m-%d} is before the first ICESat-2 data "
            f"({FIRST_DATA:%Y-%m-%d})"
        )
    return TimeRange(lo, hi)


def _is_plain_date(value: date | datetime | str) -> bool:
    if isinstance(value, str):
        return len(value.strip()) == 10
    return not isinstance(value, datetime)


def _as_datetime(value: date | datetime | str, what: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise CycleError(f"{what} date {value!r} is not an ISO date (YYYY-MM-DD)") from exc
    if not isinstance(value, datetime):
        value = datetime.combine(value, time(), tzinfo=UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
