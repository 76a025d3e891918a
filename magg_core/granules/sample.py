"""Synthetic ATL06 granules: the built-in sample for ``magg demo``, tests and benchmarks.

Real granules need Earthdata credentials and hundreds of MB; the sample needs
neither, yet exercises every path the real data does. It is deterministic in
its seed (same seed, byte-identical files) and realistic where magg's code can
tell the difference:

- **Layout** as NSIDC writes it: six beam groups ``gt1l … gt3r`` with
  ``land_ice_segments/{latitude, longitude, h_li, h_li_sigma,
  atl06_quality_summary, delta_time, segment_id}``, shuffle + gzip,
  ``_FillValue`` 3.4028235e38 on heights. One granule lacks a beam, as real
  granules sometimes do. Two file layouts (``layout=``, docs/architecture.md §ATL06 files):

  - ``"r006"`` (the default): chunks of 10,000 rows, superblock v0 (h5py's
    default ``libver``; h5coro reads nothing newer);
  - ``"r007"``, release 007's cloud-optimized files: paged aggregation
    (file-space strategy PAGE, 8 MiB pages, persistent free space, hence
    superblock v2), unlimited maximum dimension, chunks of 100,000 rows,
    creation-order-tracked groups, ``delta_time`` a dimension scale attached
    to the other datasets; with ``repack=True`` each file is then passed
    through ``h5repack`` keeping those file-space settings, as NSIDC does.
- **Geometry** of ICESat-2's repeat orbit: 1,387 reference ground tracks (RGTs)
  per 91-day cycle, inclination 92°, the Earth turning under the orbit (so
  ground tracks are not quite great circles), segments every 20 m, beam pairs
  3.3 km apart with pair members 90 m apart. Which RGTs cross the region, and
  when, follows from the orbit, so file names, times and positions agree.
- **Values**: a smooth dome-shaped ice-sheet surface with undulations and
  noise, ``h_li_sigma`` 0.02–0.5 m, runs of fill values (no surface found) and
  of bad-quality rows carrying blunders, so that filtering visibly matters.
- **Catalog records** as CMR returns them in a ``granules.umm_json`` page: a
  counter-clockwise footprint polygon enclosing all beams, temporal extent,
  S3 and HTTPS URLs in NSIDC's layout, sizes and an MD5 checksum.

:func:`write_cycles` flies the same passes in several cycles over a surface
that changes in time, for the height-change fit: a known slope field
(:func:`planted_surface`) and rate (:func:`planted_dhdt`), a steep, thinning
"glacier" patch among them, with repeat passes offset across track.

The orbit is simplified (circular, spherical Earth, RGT 1's ascending node at
0°E); no statement about where a real RGT lies should be drawn from it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from magg_core.cycles import (
    ATLAS_EPOCH,
    CYCLE_DAYS,
    RGTS_PER_CYCLE,
    cycle_range,
    delta_time_utc,
)

BEAMS = ("gt1l", "gt1r", "gt2l", "gt2r", "gt3l", "gt3r")
FILL_VALUE = np.float32(3.4028235e38)
CHUNK_ROWS = 10_000
LAYOUTS = ("r006", "r007")
R007_CHUNK_ROWS = 100_000
R007_PAGE_BYTES = 8 * 2**20
R007_FILE_OPTIONS = {
    "fs_strategy": "page",
    "fs_persist": True,
    "fs_page_size": R007_PAGE_BYTES,
    "track_order": True,
}
"""h5py's spelling of release 007's file-space settings (docs/architecture.md §ATL06 files)."""
VERSION = "007"
REVISION = "01"

EARTH_RADIUS_M = 6_371_008.8
INCLINATION_DEG = 92.0
REV_SECONDS = CYCLE_DAYS * 86_400 / RGTS_PER_CYCLE
"""One revolution: the repeat orbit fits exactly 1,387 of them in 91 days."""
EARTH_TURN_DEG_PER_S = 360.0 / 86_400
"""Rate at which the ground turns under the orbit plane (rotation minus nodal
precession); with an exact 91-day repeat this is one turn per solar day."""
SEGMENT_M = 20.0
"""``segment_id`` counts 20 m steps from the ascending node, whatever spacing
the sample uses."""

PAIR_SPACING_M = 3_300.0
BEAM_SPACING_M = 90.0
FOOTPRINT_MARGIN_M = 150.0
"""The footprint polygon lies this far outside the outermost beams and the track's ends."""
FOOTPRINT_STEP_M = 10_000.0

DEMO_CENTRE = (-75.5, 123.0)
"""Near Dome C, East Antarctica: far from the antimeridian and the pole."""
DEMO_EXTENT_KM = 400.0

S3_PREFIX = "s3://nsidc-cumulus-prod-protected/ATLAS/ATL06"
HTTPS_PREFIX = "https://data.nsidc.earthdatacloud.nasa.gov/nsidc-cumulus-prod-protected/ATLAS/ATL06"


@dataclass(frozen=True)
class SampleGranule:
    """One written granule and its CMR record.

    ``umm`` is one item of a CMR ``search/granules.umm_json`` page, i.e.
    ``{"meta": {...}, "umm": {...}}``, ready for a fake CMR to serve.
    """

    name: str
    path: Path
    umm: dict[str, Any] = field(repr=False)

    @property
    def s3_url(self) -> str:
        return _related_url(self.umm, "GET DATA VIA DIRECT ACCESS")

    @property
    def https_url(self) -> str:
        return _related_url(self.umm, "GET DATA")


@dataclass(frozen=True)
class _Pass:
    """One RGT crossing the region: which revolution, which way, and when."""

    rgt: int
    ascending: bool
    u_centre: float
    """Argument of latitude (radians from the ascending node) at the centre's latitude."""
    node_time: datetime
    """When this revolution crossed its ascending node."""


def write_sample(
    directory: str | Path,
    *,
    n_granules: int = 12,
    seed: int = 0,
    cycle: int = 22,
    centre: tuple[float, float] = DEMO_CENTRE,
    extent_km: float = DEMO_EXTENT_KM,
    spacing_m: float = SEGMENT_M,
    layout: str = "r006",
    chunk_rows: int | None = None,
    repack: bool = False,
) -> list[SampleGranule]:
    """Write ``n_granules`` synthetic ATL06 granules crossing one region.

    Parameters
    ----------
    directory
        Created if missing; files are named exactly as NSIDC names them.
    n_granules
        Passes drawn (without replacement) from the RGTs of ``cycle`` whose
        ground track crosses the region.
    seed
        Everything random derives from it: same seed, identical bytes.
    cycle
        ICESat-2 cycle; sets the file names and acquisition dates.
    centre
        Region centre ``(latitude, longitude)`` in degrees; latitude within
        ±86° (the orbit reaches 88°, and the beams need room).
    extent_km
        Diameter of the (circular) region; each track is clipped to it.
    spacing_m
        Along-track segment spacing; 20 m is ATL06's.
    layout
        ``"r006"`` or ``"r007"``: the file layout of that ATL06 release (see
        the module docstring). The values do not depend on it.
    chunk_rows
        Rows per chunk; ``None`` takes the layout's (10,000 for r006, capped
        at a beam's length as h5py requires for a fixed size; 100,000 for
        r007, whose unlimited dimension lets a chunk outgrow the beam).
    repack
        Pass each r007 file through ``h5repack`` as NSIDC does.

    Returns
    -------
    list of SampleGranule
        In acquisition order.

    Raises
    ------
    ValueError
        For an unknown layout, ``repack`` with r006, or arguments out of range.
    FileNotFoundError
        If ``repack`` is asked for and ``h5repack`` (Debian package
        ``hdf5-tools``) is not on the ``PATH``.
    """
    lat_c, lon_c = centre
    if not -86.0 <= lat_c <= 86.0:
        raise ValueError(f"centre latitude must be within ±86°, got {lat_c}")
    if n_granules < 1 or extent_km <= 0 or spacing_m <= 0 or cycle < 1:
        raise ValueError("n_granules, extent_km, spacing_m and cycle must be positive")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if repack and layout != "r007":
        raise ValueError(f"repack applies to the r007 layout only, got layout {layout!r}")
    h5repack = _h5repack() if repack else None
    rng = np.random.default_rng(seed)
    passes = _choose_passes(rng, n_granules, cycle, lat_c, lon_c, extent_km)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lacking = 1 if n_granules > 1 else None  # real granules sometimes lack a beam
    granules = []
    for i, p in enumerate(passes):
        track = _track(p, centre, extent_km, spacing_m)
        beams = {
            beam: _beam_data(rng, track, beam, lambda lat, lon, _: _surface(lat, lon, centre))
            for beam in BEAMS
        }
        if i == lacking:
            del beams["gt2r"]
        begin, end = _times(p, track["u"][[0, -1]])
        name = granule_name(begin, p.rgt, cycle, _region(lat_c, p.ascending))
        path = directory / name
        _write_h5(path, beams, p.rgt, cycle, layout, chunk_rows)
        if h5repack:
            _repack(h5repack, path)
        umm = _umm_record(name, path, begin, end, _footprint(track, spacing_m), p.rgt, cycle)
        granules.append(SampleGranule(name=name, path=path, umm=umm))
    return granules


def write_cycles(
    directory: str | Path,
    cycles: tuple[int, ...] = (20, 21, 22),
    *,
    n_granules: int = 12,
    seed: int = 0,
    centre: tuple[float, float] = DEMO_CENTRE,
    extent_km: float = DEMO_EXTENT_KM,
    spacing_m: float = SEGMENT_M,
    repeat_offset_m: float = 30.0,
    blunder_fraction: float = 0.005,
) -> dict[int, list[SampleGranule]]:
    """Write the same passes in several cycles over a surface that changes in time.

    The ``n_granules`` passes (RGTs) are drawn once, as :func:`write_sample`
    draws them for ``cycles[0]``, and flown again in every cycle: each repeat
    is the same RGT one or more whole 91-day cycles later, so file names
    differ only in the date and the cycle digits. Every pass of every cycle
    is shifted across track, all six beams together, by an offset drawn
    from a normal distribution with standard deviation ``repeat_offset_m``
    (an assumption of the sample: ICESat-2 points its beams at the reference
    tracks, and repeat passes miss them by some tens of metres).

    Heights are :func:`planted_height` plus the noise, fill runs and
    bad-quality runs of :func:`write_sample`, and a ``blunder_fraction`` of
    the good (quality 0) rows moved 5–30 m up or down: blunders no flag
    marks, which only outlier rejection removes. One granule of the first
    cycle lacks beam ``gt2r``.

    Parameters
    ----------
    directory
        Created if missing; all cycles' files go into it.
    cycles
        Distinct, increasing cycle numbers (at least one).
    n_granules, seed, centre, extent_km, spacing_m
        As for :func:`write_sample`.
    repeat_offset_m
        Standard deviation (metres) of the cross-track offset of each pass.
    blunder_fraction
        Fraction (0–1) of good rows given an unflagged blunder.

    Returns
    -------
    dict
        Cycle → its granules in acquisition order.

    Raises
    ------
    ValueError
        For cycles that are not distinct, increasing and positive, a
        negative offset, a fraction outside 0–1, or arguments
        :func:`write_sample` refuses.
    """
    lat_c, _ = centre
    if not -86.0 <= lat_c <= 86.0:
        raise ValueError(f"centre latitude must be within ±86°, got {lat_c}")
    if (
        not cycles
        or cycles[0] < 1
        or any(b <= a for a, b in zip(cycles[:-1], cycles[1:], strict=True))
    ):
        raise ValueError(f"cycles must be positive and increasing, got {cycles}")
    if n_granules < 1 or extent_km <= 0 or spacing_m <= 0:
        raise ValueError("n_granules, extent_km and spacing_m must be positive")
    if repeat_offset_m < 0 or not 0.0 <= blunder_fraction <= 1.0:
        raise ValueError(
            f"repeat_offset_m must be >= 0 and blunder_fraction within 0-1, "
            f"got {repeat_offset_m} and {blunder_fraction}"
        )
    rng = np.random.default_rng(seed)
    passes = _choose_passes(rng, n_granules, cycles[0], lat_c, centre[1], extent_km)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[int, list[SampleGranule]] = {}
    for cycle in cycles:
        later = timedelta(days=CYCLE_DAYS * (cycle - cycles[0]))
        granules = []
        for i, first in enumerate(passes):
            p = replace(first, node_time=first.node_time + later)
            track = _track(p, centre, extent_km, spacing_m)
            offset = float(rng.normal(0.0, repeat_offset_m))
            beams = {
                beam: _beam_data(
                    rng,
                    track,
                    beam,
                    lambda lat, lon, dt: planted_height(lat, lon, dt, centre),
                    offset,
                    blunder_fraction,
                )
                for beam in BEAMS
            }
            if cycle == cycles[0] and i == 1:
                del beams["gt2r"]
            begin, end = _times(p, track["u"][[0, -1]])
            name = granule_name(begin, p.rgt, cycle, _region(lat_c, p.ascending))
            path = directory / name
            _write_h5(path, beams, p.rgt, cycle, "r006", None)
            umm = _umm_record(name, path, begin, end, _footprint(track, spacing_m), p.rgt, cycle)
            granules.append(SampleGranule(name=name, path=path, umm=umm))
        written[cycle] = granules
    return written


def granule_name(begin: datetime, rgt: int, cycle: int, region: int) -> str:
    """``ATL06_<yyyymmddhhmmss>_<tttt><cc><rr>_<vvv>_<nn>.h5`` as NSIDC names granules."""
    return f"ATL06_{begin:%Y%m%d%H%M%S}_{rgt:04d}{cycle:02d}{region:02d}_{VERSION}_{REVISION}.h5"


def node_time(rgt: int, cycle: int) -> datetime:
    """When the sample's orbit crosses the equator northbound at the start of RGT ``rgt``.

    The start of ``cycle`` (:func:`magg_core.cycles.cycle_range`, the one
    source of cycle dates) plus ``rgt - 1`` revolutions. Within a day of real
    acquisitions: RGT 841 of cycle 2 comes out on 2019-02-21, the day of the
    real granule ``ATL06_20190221121851_08410203_005_01`` (tests/granules/test_sample.py).
    """
    return cycle_range(cycle).start + timedelta(seconds=(rgt - 1) * REV_SECONDS)


# --- orbit ---------------------------------------------------------------------------


def _choose_passes(
    rng: np.random.Generator, n: int, cycle: int, lat_c: float, lon_c: float, extent_km: float
) -> list[_Pass]:
    """Pick ``n`` of the cycle's passes whose centre line crosses the inner region.

    Every RGT ``k`` crosses the centre's latitude twice (descending and
    ascending); where it does so follows from its ascending node, which moves
    west by ``EARTH_TURN_DEG_PER_S * REV_SECONDS`` per revolution.
    """
    inc = np.radians(INCLINATION_DEG)
    s = np.sin(np.radians(lat_c)) / np.sin(inc)
    candidates = []
    for ascending, u in ((False, np.pi - np.arcsin(s)), (True, np.arcsin(s) % (2 * np.pi))):
        rgt = np.arange(1, RGTS_PER_CYCLE + 1)
        node_lon = -(rgt - 1) * EARTH_TURN_DEG_PER_S * REV_SECONDS
        lon = node_lon + _inertial_lon_deg(u) - EARTH_TURN_DEG_PER_S * _seconds_after_node(u)
        offset_km = (
            np.radians((lon - lon_c + 180.0) % 360.0 - 180.0)
            * np.cos(np.radians(lat_c))
            * EARTH_RADIUS_M
            / 1000
        )
        # Keep tracks whose chord through the region is at least 60 % of its diameter.
        for k in rgt[np.abs(offset_km) < 0.4 * extent_km]:
            candidates.append((int(k), ascending, float(u)))
    if len(candidates) < n:
        raise ValueError(
            f"only {len(candidates)} passes of a cycle cross a {extent_km} km region "
            f"at latitude {lat_c}; asked for {n}"
        )
    chosen = sorted(candidates[i] for i in rng.choice(len(candidates), size=n, replace=False))
    passes = [
        _Pass(rgt=k, ascending=a, u_centre=u, node_time=node_time(k, cycle)) for k, a, u in chosen
    ]
    return sorted(
        passes, key=lambda p: p.node_time + timedelta(seconds=_seconds_after_node(p.u_centre))
    )


def _inertial_lon_deg(u: np.ndarray | float) -> np.ndarray:
    """Longitude of the sub-satellite point east of the ascending node, ignoring rotation."""
    inc = np.radians(INCLINATION_DEG)
    return np.degrees(np.arctan2(np.cos(inc) * np.sin(u), np.cos(u)))


def _seconds_after_node(u: np.ndarray | float) -> np.ndarray:
    return np.asarray(u) / (2 * np.pi) * REV_SECONDS


def _track(p: _Pass, centre: tuple[float, float], extent_km: float, spacing_m: float) -> dict:
    """The pass's ground track inside the region: orbit angle, position, left normal, time.

    Positions are unit vectors (ECEF on a sphere). The ``left`` vector is the
    horizontal unit normal to the track, so beams and footprint edges are
    offsets along it: ``cos(d) p + sin(d) left`` stays on the sphere.
    """
    half = extent_km * 1000 / 2 / EARTH_RADIUS_M
    du = spacing_m / EARTH_RADIUS_M
    u = p.u_centre + np.arange(-1.5 * half, 1.5 * half, du)
    lat = np.degrees(np.arcsin(np.sin(np.radians(INCLINATION_DEG)) * np.sin(u)))
    node_lon = -(p.rgt - 1) * EARTH_TURN_DEG_PER_S * REV_SECONDS
    lon = node_lon + _inertial_lon_deg(u) - EARTH_TURN_DEG_PER_S * _seconds_after_node(u)
    xyz = _unit(lat, lon)
    inside = xyz @ _unit(*centre) >= np.cos(half)
    tangent = np.gradient(xyz, axis=0)
    left = np.cross(xyz, tangent)
    left /= np.linalg.norm(left, axis=1, keepdims=True)
    epoch_offset = (p.node_time - ATLAS_EPOCH).total_seconds()
    return {
        "u": u[inside],
        "xyz": xyz[inside],
        "left": left[inside],
        "delta_time": epoch_offset + _seconds_after_node(u[inside]),
    }


def _unit(lat: np.ndarray | float, lon: np.ndarray | float) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def _offset(xyz: np.ndarray, left: np.ndarray, metres: float) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (degrees) of points ``metres`` left of track points ``xyz``."""
    d = metres / EARTH_RADIUS_M
    xyz = np.cos(d) * xyz + np.sin(d) * left
    lat = np.degrees(np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0)))
    lon = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))
    return lat, lon


def _beam_offset_m(beam: str) -> float:
    """Pair 1 lies left, pair 3 right; within a pair, ``l`` is left of ``r``."""
    pair = int(beam[2])
    side = 1.0 if beam[3] == "l" else -1.0
    return (2 - pair) * PAIR_SPACING_M + side * BEAM_SPACING_M / 2


def _region(lat: float, ascending: bool) -> int:
    """ATL06 granule region: 10 going south, 11 over the pole cap, 12 coming north."""
    if lat < -80.0:
        return 11
    if lat > 80.0:
        return 4
    if lat < 0:
        return 12 if ascending else 10
    return 3 if ascending else 5


def _times(p: _Pass, u: np.ndarray) -> list[datetime]:
    return [p.node_time + timedelta(seconds=float(s)) for s in _seconds_after_node(u)]


# --- values --------------------------------------------------------------------------

PLANTED_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
"""Epoch at which the multi-cycle sample's surface is :func:`planted_surface`."""
JULIAN_YEAR_S = 365.25 * 86_400
"""Seconds in a Julian year, the year of the planted rates (IAU)."""
GLACIER_DIRECTION_DEG = 30.0
"""The glacier's ramp falls toward this azimuth, counted from east toward north."""
GLACIER_CURVATURE = 2.0e-7
"""Curvature (1/m) of the ramp: its slope grows by 0.2 ‰ per kilometre."""
GLACIER_CENTRE_KM = 130.0
"""Distance of the glacier patch's centre from the region centre, down the ramp."""
GLACIER_RADIUS_KM = 45.0
GLACIER_DHDT = -0.5
BACKGROUND_DHDT = 0.05


def _local_km(
    lat: np.ndarray, lon: np.ndarray, centre: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """East and north distances (km) from the centre on a local equirectangular map."""
    lat_c, lon_c = centre
    x = np.radians(lon - lon_c) * np.cos(np.radians(lat_c)) * EARTH_RADIUS_M / 1000
    y = np.radians(lat - lat_c) * EARTH_RADIUS_M / 1000
    return x, y


def _down_ramp_km(lat: np.ndarray, lon: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    x, y = _local_km(lat, lon, centre)
    a = np.radians(GLACIER_DIRECTION_DEG)
    return x * np.cos(a) + y * np.sin(a)


def planted_surface(
    lat: np.ndarray, lon: np.ndarray, centre: tuple[float, float] = DEMO_CENTRE
) -> np.ndarray:
    """The multi-cycle sample's surface (m) at :data:`PLANTED_EPOCH`.

    The dome of :func:`write_sample` raised 800 m, without its short (33 km) undulation,
    minus a ramp ``GLACIER_CURVATURE / 2 * d**2`` beyond the line through the
    centre, ``d`` metres down the azimuth :data:`GLACIER_DIRECTION_DEG`. The
    ramp steepens slowly, so within a 1.6 km cell it is nearly a plane (at
    most ~5 cm off one), yet is 2–3.5 % steep over the glacier patch.

    Parameters
    ----------
    lat, lon
        Degrees, any matching shapes.
    centre
        The region centre ``(latitude, longitude)`` the sample was written for.
    """
    lat_c, lon_c = centre
    dome = _unit(lat_c + 1.2, lon_c - 2.0)
    r_km = np.arccos(np.clip(_unit(lat, lon) @ dome, -1.0, 1.0)) * EARTH_RADIUS_M / 1000
    x, y = _local_km(lat, lon, centre)
    profile = 3200.0 * np.clip(1.0 - r_km / 1500.0, 0.0, None) ** 0.375
    d = np.clip(_down_ramp_km(lat, lon, centre), 0.0, None) * 1000
    return (
        800.0 + profile + 6.0 * np.sin(x / 23.0) * np.cos(y / 31.0) - GLACIER_CURVATURE / 2 * d**2
    )


def planted_dhdt(
    lat: np.ndarray, lon: np.ndarray, centre: tuple[float, float] = DEMO_CENTRE
) -> np.ndarray:
    """The multi-cycle sample's rate of height change (m/yr).

    :data:`GLACIER_DHDT` within :data:`GLACIER_RADIUS_KM` of the glacier
    patch's centre (:data:`GLACIER_CENTRE_KM` down the ramp), where the
    surface is steep; :data:`BACKGROUND_DHDT` elsewhere. The edge is sharp.
    """
    x, y = _local_km(lat, lon, centre)
    a = np.radians(GLACIER_DIRECTION_DEG)
    gx, gy = GLACIER_CENTRE_KM * np.cos(a), GLACIER_CENTRE_KM * np.sin(a)
    inside = np.hypot(x - gx, y - gy) < GLACIER_RADIUS_KM
    return np.where(inside, GLACIER_DHDT, BACKGROUND_DHDT)


def planted_height(
    lat: np.ndarray,
    lon: np.ndarray,
    delta_time: np.ndarray,
    centre: tuple[float, float] = DEMO_CENTRE,
) -> np.ndarray:
    """Noise-free height (m): ``planted_surface + planted_dhdt * (t - PLANTED_EPOCH)``.

    ``delta_time`` is ATL06's, seconds since :data:`ATLAS_EPOCH`
    (2018-01-01T00:00:00 UTC; no leap second since); ``t`` is in Julian years.
    """
    since = (PLANTED_EPOCH - ATLAS_EPOCH).total_seconds()
    years = (np.asarray(delta_time) - since) / JULIAN_YEAR_S
    return planted_surface(lat, lon, centre) + planted_dhdt(lat, lon, centre) * years


def _surface(lat: np.ndarray, lon: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """A dome-shaped ice sheet (a Vialov-like profile) with gentle undulations, in metres."""
    lat_c, lon_c = centre
    dome = _unit(lat_c + 1.2, lon_c - 2.0)
    r_km = np.arccos(np.clip(_unit(lat, lon) @ dome, -1.0, 1.0)) * EARTH_RADIUS_M / 1000
    x = np.radians(lon - lon_c) * np.cos(np.radians(lat_c)) * EARTH_RADIUS_M / 1000
    y = np.radians(lat - lat_c) * EARTH_RADIUS_M / 1000
    profile = 3200.0 * np.clip(1.0 - r_km / 1500.0, 0.0, None) ** 0.375
    return profile + 6.0 * np.sin(x / 23.0) * np.cos(y / 31.0) + 2.0 * np.sin((x + y) / 5.3)


def _runs(rng: np.random.Generator, n: int, count: int, shortest: int, longest: int) -> np.ndarray:
    """A boolean mask with ``count`` runs of consecutive rows set."""
    mask = np.zeros(n, dtype=bool)
    for start, length in zip(
        rng.integers(0, n, count), rng.integers(shortest, longest + 1, count), strict=True
    ):
        mask[start : start + length] = True
    return mask


def _beam_data(
    rng: np.random.Generator,
    track: dict,
    beam: str,
    heights: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    pass_offset_m: float = 0.0,
    blunder_fraction: float = 0.0,
) -> dict[str, np.ndarray]:
    """One beam's ``land_ice_segments`` columns.

    ``heights(lat, lon, delta_time)`` is the noise-free surface in metres;
    ``pass_offset_m`` shifts the whole pass left of its reference track; a
    ``blunder_fraction`` of the good (quality 0) rows is moved 5–30 m.
    """
    lat, lon = _offset(track["xyz"], track["left"], _beam_offset_m(beam) + pass_offset_m)
    n = lat.size
    sigma = np.clip(rng.lognormal(np.log(0.06), 0.6, n), 0.02, 0.5)
    h = heights(lat, lon, track["delta_time"]) + rng.normal(0.0, sigma)
    bad = _runs(rng, n, max(1, n // 4000), 10, 300)
    h[bad] += rng.choice([-1.0, 1.0], bad.sum()) * rng.uniform(5.0, 60.0, bad.sum())
    quality = bad.astype(np.int8)
    if blunder_fraction > 0:
        blunder = ~bad & (rng.random(n) < blunder_fraction)
        h[blunder] += rng.choice([-1.0, 1.0], blunder.sum()) * rng.uniform(5.0, 30.0, blunder.sum())
    h = h.astype(np.float32)
    sigma = sigma.astype(np.float32)
    no_surface = _runs(rng, n, max(1, n // 8000), 5, 200)
    h[no_surface] = FILL_VALUE
    sigma[no_surface] = FILL_VALUE
    sigma[rng.choice(n, max(1, n // 5000), replace=False)] = FILL_VALUE  # sigma alone missing
    return {
        "latitude": lat,
        "longitude": lon,
        "h_li": h,
        "h_li_sigma": sigma,
        "atl06_quality_summary": quality,
        "segment_id": np.round(track["u"] * EARTH_RADIUS_M / SEGMENT_M).astype(np.int32),
        "delta_time": track["delta_time"],
    }


# --- files ---------------------------------------------------------------------------

_ATTRS = {
    "latitude": {"units": "degrees_north", "long_name": "Latitude"},
    "longitude": {"units": "degrees_east", "long_name": "Longitude"},
    "h_li": {"units": "meters", "long_name": "Land Ice height"},
    "h_li_sigma": {"units": "meters", "long_name": "Expected RMS segment misfit"},
    "atl06_quality_summary": {"units": "1", "long_name": "ATL06_Quality_Summary"},
    "delta_time": {"units": "seconds since 2018-01-01", "long_name": "Elapsed GPS seconds"},
    "segment_id": {"units": "1", "long_name": "Reference Point, m"},
}


def _write_h5(
    path: Path,
    beams: dict[str, dict[str, np.ndarray]],
    rgt: int,
    cycle: int,
    layout: str,
    chunk_rows: int | None,
) -> None:
    r007 = layout == "r007"
    order = True if r007 else None  # None is h5py's default, as r006 samples were written
    with h5py.File(path, "w", **(R007_FILE_OPTIONS if r007 else {})) as f:
        f.attrs["short_name"] = "ATL06"
        f.attrs["identifier_product_format_version"] = VERSION
        orbit = f.create_group("orbit_info", track_order=order)
        orbit.create_dataset("rgt", data=np.array([rgt], dtype=np.int16))
        orbit.create_dataset("cycle_number", data=np.array([cycle], dtype=np.int8))
        orbit.create_dataset("sc_orient", data=np.array([1], dtype=np.int8))
        ancillary = f.create_group("ancillary_data", track_order=order)
        ancillary.create_dataset("atlas_sdp_gps_epoch", data=np.array([1198800018.0]))
        # As a real granule states its first time twice: seconds since the epoch, and UTC.
        start = min(float(c["delta_time"].min()) for c in beams.values() if c["delta_time"].size)
        stamp = delta_time_utc(start).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        ancillary.create_dataset("start_delta_time", data=np.array([start]))
        ancillary.create_dataset("data_start_utc", data=np.array([stamp.encode()]))
        for beam, columns in beams.items():
            if r007:
                f.create_group(beam, track_order=order)
            group = f.create_group(f"{beam}/land_ice_segments", track_order=order)
            n = columns["latitude"].size
            if r007:
                chunks, maxshape = (chunk_rows or R007_CHUNK_ROWS,), (None,)
            else:
                chunks, maxshape = (min(chunk_rows or CHUNK_ROWS, n),), None
            for name in _ATTRS:
                data = columns[name]
                heights = name in ("h_li", "h_li_sigma")
                dset = group.create_dataset(
                    name,
                    data=data,
                    chunks=chunks,
                    maxshape=maxshape,
                    compression="gzip",
                    shuffle=True,
                    fillvalue=FILL_VALUE if heights else None,
                )
                for key, value in _ATTRS[name].items():
                    dset.attrs[key] = value
                if heights:
                    dset.attrs["_FillValue"] = np.array([FILL_VALUE], dtype=np.float32)
            if r007:
                _attach_time_scale(group)


def _attach_time_scale(group: h5py.Group) -> None:
    """Make ``delta_time`` the dimension scale of every dataset of the group, as ATL06 does."""
    scale = group["delta_time"]
    scale.make_scale("delta_time")
    for name in _ATTRS:
        if name != "delta_time":
            group[name].dims[0].attach_scale(scale)


def _h5repack() -> str:
    found = shutil.which("h5repack")
    if found is None:
        raise FileNotFoundError(
            "repack=True needs h5repack on the PATH (Debian package hdf5-tools)"
        )
    return found


def _repack(h5repack: str, path: Path) -> None:
    """Rewrite ``path`` through h5repack, keeping paged aggregation and persistent free space."""
    packed = path.with_name(path.name + ".repacked")
    options = ["-S", "PAGE", "-P", "1", "-G", str(R007_PAGE_BYTES)]
    subprocess.run([h5repack, *options, str(path), str(packed)], check=True, capture_output=True)
    packed.replace(path)


# --- catalog record ------------------------------------------------------------------


def _footprint(track: dict, spacing_m: float) -> list[tuple[float, float]]:
    """Closed, counter-clockwise ``(lon, lat)`` ring around all six beams.

    Walking forward along the right edge and back along the left edge keeps
    the strip on the left: counter-clockwise seen from outside the Earth, as
    CMR requires, without any planar (antimeridian-fragile) area test.
    """
    n = track["u"].size
    step = max(1, int(FOOTPRINT_STEP_M / spacing_m))
    rows = np.unique(np.r_[np.arange(0, n, step), n - 1])
    xyz, left = track["xyz"][rows], track["left"][rows]
    # Stretch both ends along the track so the first and last segments are inside too.
    forward = np.cross(left, xyz)
    m = FOOTPRINT_MARGIN_M / EARTH_RADIUS_M
    xyz[0] = np.cos(m) * xyz[0] - np.sin(m) * forward[0]
    xyz[-1] = np.cos(m) * xyz[-1] + np.sin(m) * forward[-1]
    edge = PAIR_SPACING_M + BEAM_SPACING_M / 2 + FOOTPRINT_MARGIN_M
    right_lat, right_lon = _offset(xyz, left, -edge)
    left_lat, left_lon = _offset(xyz, left, edge)
    lons = np.r_[right_lon, left_lon[::-1], right_lon[:1]]
    lats = np.r_[right_lat, left_lat[::-1], right_lat[:1]]
    return [(round(float(lo), 6), round(float(la), 6)) for lo, la in zip(lons, lats, strict=True)]


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _umm_record(
    name: str,
    path: Path,
    begin: datetime,
    end: datetime,
    ring: list[tuple[float, float]],
    rgt: int,
    cycle: int,
) -> dict[str, Any]:
    """The granule as one item of a CMR ``granules.umm_json`` page."""
    data = path.read_bytes()
    key = f"{VERSION}/{begin:%Y/%m/%d}/{name}"
    digits = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10**10
    produced = _iso(end + timedelta(days=23))
    return {
        "meta": {
            "concept-type": "granule",
            "concept-id": f"G{digits:010d}-NSIDC_CPRD",
            "revision-id": 1,
            "native-id": name,
            "provider-id": "NSIDC_CPRD",
            "format": "application/vnd.nasa.cmr.umm+json",
            "revision-date": produced,
        },
        "umm": {
            "GranuleUR": name,
            "CollectionReference": {"ShortName": "ATL06", "Version": VERSION},
            "TemporalExtent": {
                "RangeDateTime": {"BeginningDateTime": _iso(begin), "EndingDateTime": _iso(end)}
            },
            "SpatialExtent": {
                "HorizontalSpatialDomain": {
                    "Geometry": {
                        "GPolygons": [
                            {
                                "Boundary": {
                                    "Points": [{"Longitude": lo, "Latitude": la} for lo, la in ring]
                                }
                            }
                        ]
                    },
                    "Track": {"Cycle": cycle, "Passes": [{"Pass": rgt}]},
                }
            },
            "RelatedUrls": [
                {
                    "URL": f"{S3_PREFIX}/{key}",
                    "Type": "GET DATA VIA DIRECT ACCESS",
                    "Description": "Direct download access via S3 to the granule",
                },
                {
                    "URL": f"{HTTPS_PREFIX}/{key}",
                    "Type": "GET DATA",
                    "Description": "Download " + name,
                },
            ],
            "DataGranule": {
                "ArchiveAndDistributionInformation": [
                    {
                        "Name": name,
                        "SizeInBytes": len(data),
                        "Size": round(len(data) / 2**20, 4),
                        "SizeUnit": "MB",
                        "Checksum": {"Value": hashlib.md5(data).hexdigest(), "Algorithm": "MD5"},
                    }
                ],
                "DayNightFlag": "Unspecified",
                "ProductionDateTime": produced,
            },
            "MetadataSpecification": {
                "URL": "https://cdn.earthdata.nasa.gov/umm/granule/v1.6.6",
                "Name": "UMM-G",
                "Version": "1.6.6",
            },
        },
    }


def _related_url(item: dict[str, Any], kind: str) -> str:
    return next(u["URL"] for u in item["umm"]["RelatedUrls"] if u["Type"] == kind)
