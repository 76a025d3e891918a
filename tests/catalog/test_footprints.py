"""Granule footprints (UMM-G GPolygons, great-circle edges) → parent cells."""

import numpy as np
import pytest

from magg_core.catalog.footprints import FootprintError, footprint_cells, footprint_polygons
from magg_core.morton import point_morton

ORDER = 6


def umm(*polygons, holes=()):
    """UMM-G ``umm`` with one GPolygon per ``(lon, lat)`` ring; ``holes`` go on the first."""

    def points(ring):
        return {"Points": [{"Longitude": lo, "Latitude": la} for lo, la in ring]}

    gpolygons = [{"Boundary": points(r)} for r in polygons]
    if holes:
        gpolygons[0]["ExclusiveZone"] = {"Boundaries": [points(h) for h in holes]}
    return {"SpatialExtent": {"HorizontalSpatialDomain": {"Geometry": {"GPolygons": gpolygons}}}}


def covered(cells, lat, lon, order=ORDER):
    return np.isin(point_morton(np.asarray(lat), np.asarray(lon), order), cells)


def cap_points(rng, n, lat_min, lat_max, lon_min=-180.0, lon_max=180.0):
    z = rng.uniform(np.sin(np.radians(lat_min)), np.sin(np.radians(lat_max)), n)
    lon = rng.uniform(lon_min, lon_max, n)
    return np.degrees(np.arcsin(z)), ((lon + 180.0) % 360.0) - 180.0


@pytest.mark.parametrize("direction", [1, -1])
def test_footprint_containing_the_south_pole(direction):
    # A ring round the pole at 87°S, vertices every 30°: CMR's geodetic polygons
    # may contain a pole; either winding means the small cap.
    lons = np.arange(0, 360, 30)[::direction]
    ring = [((lo + 180) % 360 - 180, -87.0) for lo in lons] + [((lons[0] + 180) % 360 - 180, -87.0)]
    cells = footprint_cells(umm(ring), ORDER)
    rng = np.random.default_rng(4)
    lat, lon = cap_points(rng, 20_000, -90, -87.2)  # edges dip to 87.1°S between vertices
    assert covered(cells, lat, lon).all()
    far_lat, far_lon = cap_points(rng, 20_000, -85.0, -80.0)
    assert not covered(cells, far_lat, far_lon).any()


def test_footprint_crossing_the_antimeridian():
    south = [(lo, -70.0) for lo in range(170, 191)]
    north = [(lo, -60.0) for lo in range(190, 169, -1)]
    ring = [((lo + 180) % 360 - 180, la) for lo, la in south + north + south[:1]]
    cells = footprint_cells(umm(ring), ORDER)
    rng = np.random.default_rng(5)
    lat, lon = cap_points(rng, 20_000, -69.9, -60.1, 170, 190)
    assert covered(cells, lat, lon).all()
    far_lat, far_lon = cap_points(rng, 20_000, -70, -60, -160, 160)
    assert not covered(cells, far_lat, far_lon).any()
    assert cells.size < 200  # ~100 cells in a 20° × 10° box; the whole band would be ~2,000


def test_exclusive_zone_is_a_hole_and_polygons_unite():
    outer = [(0, -80), (40, -80), (40, -70), (0, -70), (0, -80)]
    hole = [(15, -77), (25, -77), (25, -73), (15, -73), (15, -77)]
    cells = footprint_cells(umm(outer, holes=[hole]), ORDER)
    assert covered(cells, [-79.0, -75.0], [5.0, 20.0]).tolist() == [True, False]
    # Two overlapping polygons: their overlap stays covered (no even-odd cancelling).
    shifted = [(lo + 10, la) for lo, la in outer]
    both = footprint_cells(umm(outer, shifted), ORDER)
    assert covered(both, [-75.0, -75.0, -75.0], [5.0, 25.0, 45.0]).all()
    assert np.all(np.diff(both) > 0)


def test_polygon_parsing_drops_repeats():
    ring = [(0, -80), (0, -80), (40, -80), (40, -70), (0, -70), (0, -80)]
    [[boundary]] = footprint_polygons(umm(ring))
    assert boundary.tolist() == [[-80, 0], [-80, 40], [-70, 40], [-70, 0]]  # lat, lon


@pytest.mark.parametrize(
    ("record", "problem", "message"),
    [
        ({}, "missing_footprint", "no GPolygons"),
        (
            {
                "SpatialExtent": {
                    "HorizontalSpatialDomain": {"Geometry": {"BoundingRectangles": [{}]}}
                }
            },
            "missing_footprint",
            "has only BoundingRectangles",
        ),
        (umm([(0, -80), (1, -80), (0, -80)]), "degenerate_footprint", "2 distinct vertices"),
        (umm([(0, -80), (1, -91), (1, -79), (0, -80)]), "degenerate_footprint", "out of range"),
        (umm([(0, -80), (1, float("nan")), (1, -79), (0, -80)]), "degenerate_footprint", "range"),
        (
            {
                "SpatialExtent": {
                    "HorizontalSpatialDomain": {"Geometry": {"GPolygons": [{"Boundary": {}}]}}
                }
            },
            "degenerate_footprint",
            "no Points list",
        ),
        (
            {
                "SpatialExtent": {
                    "HorizontalSpatialDomain": {
                        "Geometry": {"GPolygons": [{"Boundary": {"Points": [{"Lon": 0}]}}]}
                    }
                }
            },
            "degenerate_footprint",
            "not a Latitude/Longitude pair",
        ),
    ],
)
def test_unusable_footprints(record, problem, message):
    with pytest.raises(FootprintError, match=message) as info:
        footprint_cells(record, ORDER)
    assert info.value.problem == problem
