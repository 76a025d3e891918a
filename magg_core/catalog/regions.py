"""Regions to grid: named outlines shipped with magg, or any GeoJSON polygon.

A region's job is cell discovery: the parent cells (mortie ``morton_coverage``)
that cover it, in ascending morton order, plus a bounding box for the CMR
query. GeoJSON draws edges as straight lines in longitude/latitude (RFC 7946)
and closes a polar cap with a run of vertices along the pole, while mortie
joins vertices by great circles. Each ring is therefore densified in
longitude/latitude first, so its great-circle edges follow the GeoJSON
edges; mapped onto the sphere, the pole run collapses to one point and the
cut down the antimeridian to the pole and back up becomes a zero-width spike,
which is removed. What is left is the ring the GeoJSON means — for
Antarctica, the coastline around the pole.

Built-in outlines (``magg_core/regions/*.geojson``) name their source, licence
and simplification in their properties.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import mortie
import numpy as np

from magg_core.errors import InputError

BUILTIN_REGIONS = ("antarctica", "greenland")

DENSIFY_DEG = 0.5
"""Longest GeoJSON edge (in either coordinate) kept as one great-circle edge;
over 0.5° a great circle departs from a line of constant latitude by < 0.3 km."""

_SAME_POINT = 1e-9
"""Unit vectors closer than this (~6 mm) are one point on the sphere."""

BOX_PAD_DEG = 0.1
"""Latitude padding of the CMR bounding box, for great-circle bulge between vertices."""


class RegionError(InputError, ValueError):
    """A region that cannot be used; the message says which and where."""


@dataclass(frozen=True, eq=False)
class Region:
    """A region as spherical polygons, each ``(boundary, *holes)``.

    Each ring is an ``(n, 2)`` array of ``(latitude, longitude)`` in degrees,
    open (no repeated closing vertex), joined by great circles.
    """

    name: str
    polygons: tuple[tuple[np.ndarray, ...], ...]

    @property
    def rings(self) -> list[np.ndarray]:
        return [ring for polygon in self.polygons for ring in polygon]

    def cells(self, order: int) -> np.ndarray:
        """Sorted ``uint64`` morton words of the order-``order`` cells covering the region.

        Every cell the outline touches is included, as is every cell whose
        centre lies inside, so no point of the region falls in a cell left out.
        Polygons are covered one by one (holes by mortie's even-odd rule) and
        united, so overlapping features add up rather than cancel.
        """
        covers = [
            mortie.morton_coverage([r[:, 0] for r in rings], [r[:, 1] for r in rings], order=order)
            for rings in self.polygons
        ]
        return np.unique(np.concatenate(covers)).astype(np.uint64)

    def bounding_box(self) -> tuple[float, float, float, float]:
        """``(west, south, east, north)`` in degrees enclosing the region, for CMR.

        ``west > east`` means the box crosses the antimeridian, as CMR expects.
        A region around a pole spans all longitudes up to that pole.
        """
        points = np.concatenate(self.rings)
        south = max(float(points[:, 0].min()) - BOX_PAD_DEG, -90.0)
        north = min(float(points[:, 0].max()) + BOX_PAD_DEG, 90.0)
        poles = {_enclosed_pole(ring) for ring in self.rings} - {None}
        if -1 in poles:
            south = -90.0
        if 1 in poles:
            north = 90.0
        if poles or np.any(np.abs(points[:, 0]) >= 90.0):
            return (-180.0, south, 180.0, north)
        west, east = _longitude_span(points[:, 1])
        return (west, south, east, north)


def load_region(spec: str | Path) -> Region:
    """A built-in region by name (``antarctica``, ``greenland``) or a GeoJSON file.

    Raises
    ------
    RegionError
        For an unknown name, an unreadable file, or GeoJSON that is not
        Polygon/MultiPolygon geometry (bare, in a Feature, or in a
        FeatureCollection) with valid coordinates.
    """
    text_spec = str(spec)
    if text_spec in BUILTIN_REGIONS:
        source = resources.files("magg_core").joinpath("regions", f"{text_spec}.geojson")
        return region_from_geojson(json.loads(source.read_text()), name=text_spec)
    path = Path(text_spec)
    if path.suffix.lower() not in (".geojson", ".json") and not path.exists():
        raise RegionError(
            f"unknown region {text_spec!r}: use one of {', '.join(BUILTIN_REGIONS)} "
            "or the path of a GeoJSON file"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise RegionError(f"cannot read region file {text_spec!r}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegionError(f"region file {text_spec!r} is not JSON: {exc}") from exc
    return region_from_geojson(data, name=path.stem, where=text_spec)


def region_from_geojson(data: Any, *, name: str, where: str = "GeoJSON") -> Region:
    """Turn GeoJSON Polygon/MultiPolygon geometry into a :class:`Region`."""
    polygons = []
    for path, polygon in _polygons(data, "$", where):
        if not isinstance(polygon, list) or not polygon:
            raise RegionError(f"{where}: {path} must be a non-empty list of rings")
        polygons.append(
            tuple(
                _spherical_ring(_positions(ring, f"{path}[{i}]", where), f"{path}[{i}]", where)
                for i, ring in enumerate(polygon)
            )
        )
    if not polygons:
        raise RegionError(f"{where}: no polygons found")
    return Region(name=name, polygons=tuple(polygons))


def _polygons(data: Any, path: str, where: str) -> list[tuple[str, Any]]:
    """Every polygon's coordinate list, with a JSON path for error messages."""
    if not isinstance(data, Mapping):
        raise RegionError(f"{where}: {path} must be an object, got {type(data).__name__}")
    kind = data.get("type")
    if kind == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise RegionError(f"{where}: {path}.features must be a list")
        return [
            p for i, f in enumerate(features) for p in _polygons(f, f"{path}.features[{i}]", where)
        ]
    if kind == "Feature":
        if data.get("geometry") is None:
            raise RegionError(f"{where}: {path}.geometry is missing or null")
        return _polygons(data["geometry"], f"{path}.geometry", where)
    if kind == "Polygon":
        return [(f"{path}.coordinates", data.get("coordinates"))]
    if kind == "MultiPolygon":
        parts = data.get("coordinates")
        if not isinstance(parts, list):
            raise RegionError(f"{where}: {path}.coordinates must be a list of polygons")
        return [(f"{path}.coordinates[{i}]", p) for i, p in enumerate(parts)]
    raise RegionError(
        f"{where}: {path} has type {kind!r}; a region needs Polygon or MultiPolygon geometry "
        "(bare, in a Feature, or in a FeatureCollection)"
    )


def _positions(ring: Any, path: str, where: str) -> np.ndarray:
    """Validated ``(lon, lat)`` positions of one ring, closed."""
    if not isinstance(ring, list):
        raise RegionError(f"{where}: {path} must be a list of [longitude, latitude] positions")
    points = []
    for j, pos in enumerate(ring):
        if (
            not isinstance(pos, list | tuple)
            or len(pos) < 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pos[:2])
            or not all(math.isfinite(v) for v in pos[:2])
        ):
            raise RegionError(
                f"{where}: {path}[{j}] must be [longitude, latitude] numbers, got {pos!r}"
            )
        lon, lat = float(pos[0]), float(pos[1])
        if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
            raise RegionError(
                f"{where}: {path}[{j}] = {pos!r} is out of range "
                "(longitude -180..180, latitude -90..90, in that order)"
            )
        points.append((lon, lat))
    if points and points[0] != points[-1]:
        points.append(points[0])
    if len(points) < 4:
        raise RegionError(f"{where}: {path} needs at least 3 distinct positions")
    positions = np.array(points)
    dlon = np.abs(np.diff(positions[:, 0]))
    dlat = np.diff(positions[:, 1])
    bad = np.flatnonzero((dlon > 180.0) & (dlat != 0.0))
    if bad.size:
        j = int(bad[0])
        raise RegionError(
            f"{where}: {path} edge {j}→{j + 1} spans {dlon[j]:.1f}° of longitude; GeoJSON edges "
            "are straight in longitude/latitude, so split polygons at the antimeridian "
            "(RFC 7946 §3.1.9)"
        )
    return positions


def _spherical_ring(positions: np.ndarray, path: str, where: str) -> np.ndarray:
    """Densify a closed planar ring, map it to the sphere, drop repeats and spikes."""
    start, stop = positions[:-1], positions[1:]
    steps = np.maximum(np.ceil(np.abs(stop - start).max(axis=1) / DENSIFY_DEG), 1).astype(int)
    t = np.concatenate([np.arange(n) / n for n in steps])
    edge = np.repeat(np.arange(len(steps)), steps)
    lonlat = start[edge] + t[:, None] * (stop[edge] - start[edge])
    lon, lat = np.radians(lonlat[:, 0]), np.radians(lonlat[:, 1])
    xyz = np.column_stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])
    kept = _without_spikes(xyz)
    if len(kept) < 3:
        raise RegionError(f"{where}: {path} encloses no area on the sphere")
    kept = np.array(kept)
    lat_out = np.degrees(np.arcsin(np.clip(kept[:, 2], -1.0, 1.0)))
    lon_out = np.degrees(np.arctan2(kept[:, 1], kept[:, 0]))
    return np.column_stack([lat_out, lon_out])


def _without_spikes(xyz: np.ndarray) -> list[np.ndarray]:
    """A cyclic vertex list without repeated points or back-and-forth spikes.

    ``… A, P, A …`` (out to P and straight back) encloses nothing, and a cut
    is a chain of such spikes; removing them one by one, including across
    the ring's seam, leaves the enclosing outline.
    """

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(np.abs(a - b).max() < _SAME_POINT)

    out: list[np.ndarray] = []
    for p in xyz:
        if out and same(out[-1], p):
            continue
        if len(out) >= 2 and same(out[-2], p):
            out.pop()
            continue
        out.append(p)
    changed = True
    while changed and len(out) >= 3:
        changed = False
        if same(out[0], out[-1]):
            out.pop()
            changed = True
        elif same(out[-2], out[0]):
            out.pop()
            changed = True
        elif same(out[-1], out[1]):
            out.pop(0)
            changed = True
    return out


def _enclosed_pole(ring: np.ndarray) -> int | None:
    """``-1``/``1`` if the ring winds around the south/north pole, else ``None``.

    A ring winds around the polar axis when its longitude steps add up to a
    full turn; the region (the smaller side) then holds the pole on the side
    where the ring lies.
    """
    lon = np.radians(ring[:, 1])
    step = np.diff(np.r_[lon, lon[:1]])
    turns = np.round(((step + np.pi) % (2 * np.pi) - np.pi).sum() / (2 * np.pi))
    if turns == 0:
        return None
    return -1 if ring[:, 0].mean() < 0 else 1


def _longitude_span(lon: np.ndarray) -> tuple[float, float]:
    """Narrowest ``(west, east)`` longitude interval holding all ``lon`` (may cross ±180)."""
    lon = np.sort(((lon + 180.0) % 360.0) - 180.0)
    gaps = np.diff(np.r_[lon, lon[0] + 360.0])
    widest = int(np.argmax(gaps))
    if gaps[widest] <= 2 * DENSIFY_DEG:
        return (-180.0, 180.0)
    west = float(lon[(widest + 1) % lon.size])
    east = float(lon[widest])
    return (west, east)
