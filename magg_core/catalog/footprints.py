"""Granule footprints → the parent cells they touch.

A CMR granule's footprint (UMM-G ``GPolygons``) is a spherical polygon: its
vertices are joined by great circles, it may enclose a pole, and nothing
special happens at the antimeridian. mortie's ``morton_coverage`` works in
exactly that geometry (a spherical winding-number test, vertices converted to
authalic latitude like every point magg grids), so footprints go to it as
they are, with no planar step that could break at ±180° or the pole. The
cover includes every cell the outline touches, so no point inside a
footprint can fall in a cell the catalog leaves out.

A footprint that is missing or cannot be a polygon raises
:class:`FootprintError`; the catalog lists such granules in its report
rather than dropping them silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import mortie
import numpy as np

from magg_core.errors import PermanentError

Problem = Literal["missing_footprint", "degenerate_footprint"]


class FootprintError(PermanentError, ValueError):
    """A granule whose footprint gives no cells; ``problem`` says which kind."""

    def __init__(self, problem: Problem, detail: str):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


def footprint_polygons(umm: Mapping[str, Any]) -> list[list[np.ndarray]]:
    """The granule's polygons: each ``[boundary, *holes]`` of ``(n, 2)`` lat/lon rings.

    Parameters
    ----------
    umm
        The ``umm`` part of a CMR UMM-G record.

    Raises
    ------
    FootprintError
        ``missing_footprint`` when the record has no ``GPolygons``;
        ``degenerate_footprint`` when a ring is malformed, has coordinates
        out of range, or fewer than three distinct vertices.
    """
    geometry = _get(umm, "SpatialExtent", "HorizontalSpatialDomain", "Geometry")
    gpolygons = _get(geometry, "GPolygons")
    if not gpolygons or not isinstance(gpolygons, list):
        others = (
            sorted(k for k, v in geometry.items() if v) if isinstance(geometry, Mapping) else []
        )
        found = f" (the geometry has only {', '.join(others)})" if others else ""
        raise FootprintError(
            "missing_footprint", f"no GPolygons in the record's SpatialExtent{found}"
        )
    polygons = []
    for i, gpolygon in enumerate(gpolygons):
        if not isinstance(gpolygon, Mapping):
            raise FootprintError("degenerate_footprint", f"GPolygons[{i}] is not an object")
        boundary = _ring(gpolygon.get("Boundary"), f"GPolygons[{i}].Boundary")
        holes = [
            _ring(b, f"GPolygons[{i}].ExclusiveZone.Boundaries[{j}]")
            for j, b in enumerate(_get(gpolygon, "ExclusiveZone", "Boundaries") or [])
        ]
        polygons.append([boundary, *holes])
    return polygons


def footprint_cells(umm: Mapping[str, Any], order: int) -> np.ndarray:
    """Sorted ``uint64`` morton words of the order-``order`` cells a footprint touches.

    Each polygon is covered on its own (holes by mortie's even-odd rule) and
    the covers are united, so overlapping polygons never cancel out.
    """
    covers = []
    for rings in footprint_polygons(umm):
        lats = [r[:, 0] for r in rings]
        lons = [r[:, 1] for r in rings]
        try:
            cover = mortie.morton_coverage(lats, lons, order=order)
        except ValueError as exc:
            raise FootprintError("degenerate_footprint", f"mortie cannot cover it: {exc}") from None
        covers.append(np.asarray(cover, dtype=np.uint64))
    return np.unique(np.concatenate(covers)) if covers else np.empty(0, dtype=np.uint64)


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]…``, or ``None`` where a level is absent or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _ring(boundary: Any, where: str) -> np.ndarray:
    points = boundary.get("Points") if isinstance(boundary, Mapping) else None
    if not isinstance(points, list):
        raise FootprintError("degenerate_footprint", f"{where} has no Points list")
    ring = []
    for k, point in enumerate(points):
        try:
            lat, lon = float(point["Latitude"]), float(point["Longitude"])
        except (TypeError, KeyError, ValueError):
            raise FootprintError(
                "degenerate_footprint", f"{where}.Points[{k}] is not a Latitude/Longitude pair"
            ) from None
        if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
            raise FootprintError(
                "degenerate_footprint", f"{where}.Points[{k}] = ({lat}, {lon}) is out of range"
            )
        if not ring or ring[-1] != (lat, lon):
            ring.append((lat, lon))
    if len(ring) > 1 and ring[0] == ring[-1]:
        ring.pop()
    if len(set(ring)) < 3:
        raise FootprintError(
            "degenerate_footprint",
            f"{where} has {len(set(ring))} distinct vertices; a polygon needs 3",
        )
    return np.array(ring, dtype=np.float64)
