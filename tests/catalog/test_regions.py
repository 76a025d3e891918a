import json

import numpy as np
import pytest

from magg_core.catalog.regions import BUILTIN_REGIONS, RegionError, load_region, region_from_geojson
from magg_core.morton import point_morton

ORDER = 6


def covered(region, lat, lon, order=ORDER):
    """Which points fall in a cell of the region's cover."""
    words = point_morton(np.asarray(lat, float), np.asarray(lon, float), order)
    return np.isin(words, region.cells(order))


def sphere_points(rng, n, lat_min, lat_max, lon_min=-180.0, lon_max=180.0):
    """Points uniform in area inside a latitude/longitude box."""
    z = rng.uniform(np.sin(np.radians(lat_min)), np.sin(np.radians(lat_max)), n)
    lon = rng.uniform(lon_min, lon_max, n)
    return np.degrees(np.arcsin(z)), ((lon + 180.0) % 360.0) - 180.0


def polygon(*rings):
    return {"type": "Polygon", "coordinates": [list(map(list, r)) for r in rings]}


def test_builtin_regions_are_small_and_documented():
    for name in BUILTIN_REGIONS:
        region = load_region(name)
        assert region.name == name
        assert sum(len(r) for r in region.rings) < 4000
    from importlib import resources

    for name in BUILTIN_REGIONS:
        data = json.loads(
            resources.files("magg_core").joinpath("regions", f"{name}.geojson").read_text()
        )
        props = data["features"][0]["properties"]
        assert props["source"] and props["license"] and props["method"]
        vertices = sum(
            len(ring) for part in data["features"][0]["geometry"]["coordinates"] for ring in part
        )
        assert vertices <= 3000


@pytest.mark.parametrize(
    ("lat", "lon", "inside"),
    [
        (-90.0, 0.0, True),  # South Pole
        (-89.9, 123.0, True),
        (-81.0, -175.0, True),  # Ross Ice Shelf
        (-78.0, -60.0, True),  # Ronne Ice Shelf
        (-70.0, 70.0, True),  # Amery Ice Shelf
        (-80.4, 77.1, True),  # Dome A
        (-75.1, 123.35, True),  # Dome C
        (-69.0, -71.0, True),  # Alexander Island (beyond George VI Ice Shelf)
        (-60.0, 0.0, False),  # Southern Ocean
        (-65.0, -175.0, False),  # Ross Sea, open water
        (-55.0, -60.0, False),  # Drake Passage
        (72.0, -40.0, False),  # Greenland is not Antarctica
    ],
)
def test_antarctica_holds_grounded_ice_and_ice_shelves(lat, lon, inside):
    assert covered(load_region("antarctica"), [lat], [lon])[0] == inside


@pytest.mark.parametrize(
    ("lat", "lon", "inside"),
    [
        (72.58, -38.46, True),
        (61.0, -45.0, True),
        (81.5, -40.0, True),
        (69.5, -53.5, True),
        (65.0, -20.0, False),
        (-75.0, 123.0, False),
    ],
)
def test_greenland(lat, lon, inside):
    assert covered(load_region("greenland"), [lat], [lon])[0] == inside


def test_cells_are_ascending_uint64():
    cells = load_region("antarctica").cells(ORDER)
    assert cells.dtype == np.uint64
    assert np.all(np.diff(cells) > 0)
    assert 1000 < cells.size < 2500  # ~14 M km² over ~10,400 km² cells, plus the rim
    assert cells.min() >= 2**63  # southern words need uint64 (docs/architecture.md §Grid)


def test_cap_around_the_south_pole_in_planar_geojson_form():
    # RFC 7946 style: the cap south of 70°S closed along the pole.
    cap = polygon([(-180, -90), (180, -90), (180, -70), (-180, -70), (-180, -90)])
    region = region_from_geojson(cap, name="cap")
    rng = np.random.default_rng(1)
    lat, lon = sphere_points(rng, 50_000, -90, -70)
    assert covered(region, lat, lon).all()
    far_lat, far_lon = sphere_points(rng, 20_000, -67.5, -40)
    assert not covered(region, far_lat, far_lon).any()
    assert region.bounding_box() == (-180.0, -90.0, 180.0, pytest.approx(-69.9))


def test_wavy_coast_closed_along_the_antimeridian_and_the_pole():
    # A coastline that wanders in latitude, closed the way Natural Earth and
    # GSHHG close Antarctica: down the antimeridian, along the pole, back up.
    lon = np.linspace(180, -180, 721)
    coast_lat = -70 + 6 * np.sin(np.radians(3 * lon))
    ring = [*zip(lon, coast_lat, strict=True), (-180, -90), (180, -90), (180, coast_lat[0])]
    region = region_from_geojson(polygon(ring), name="wavy")
    rng = np.random.default_rng(2)
    lat, plon = sphere_points(rng, 60_000, -90, -63)
    inside = lat < -70 + 6 * np.sin(np.radians(3 * plon))
    hit = covered(region, lat, plon)
    assert hit[inside].all()
    # Nothing beyond the coast by more than ~2 cell widths is in the cover.
    far = lat > -70 + 6 * np.sin(np.radians(3 * plon)) + 2.5
    assert not hit[far].any()


def test_polygon_split_at_the_antimeridian():
    west = [(170, -70), (180, -70), (180, -60), (170, -60), (170, -70)]
    east = [(-180, -70), (-170, -70), (-170, -60), (-180, -60), (-180, -70)]
    region = region_from_geojson(
        {"type": "MultiPolygon", "coordinates": [[list(map(list, west))], [list(map(list, east))]]},
        name="am",
    )
    rng = np.random.default_rng(3)
    lat, lon = sphere_points(rng, 20_000, -70, -60, 170, 190)
    assert covered(region, lat, lon).all()
    far_lat, far_lon = sphere_points(rng, 20_000, -70, -60, -165, 165)
    assert not covered(region, far_lat, far_lon).any()
    west_edge, south, east_edge, north = region.bounding_box()
    assert (west_edge, east_edge) == (170.0, -170.0)  # crosses the antimeridian
    assert south == pytest.approx(-70.1) and north == pytest.approx(-59.9)


def test_feature_collection_and_hole():
    outer = [(0, -80), (40, -80), (40, -70), (0, -70), (0, -80)]
    hole = [(15, -77), (25, -77), (25, -73), (15, -73), (15, -77)]
    data = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": polygon(outer, hole)}],
    }
    region = region_from_geojson(data, name="donut")
    assert covered(region, [-79.0, -71.0, -75.0], [5.0, 35.0, 20.0]).tolist() == [True, True, False]


def test_overlapping_features_add_up():
    a = [(0, -80), (40, -80), (40, -70), (0, -70), (0, -80)]
    b = [(20, -80), (60, -80), (60, -70), (20, -70), (20, -80)]
    data = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": polygon(r)} for r in (a, b)],
    }
    region = region_from_geojson(data, name="overlap")
    assert covered(region, [-75.0, -75.0, -75.0], [10.0, 30.0, 50.0]).all()


def test_region_from_file(tmp_path):
    path = tmp_path / "box.geojson"
    path.write_text(json.dumps(polygon([(0, -80), (40, -80), (40, -70), (0, -70), (0, -80)])))
    region = load_region(path)
    assert region.name == "box"
    assert covered(region, [-75.0], [20.0])[0]


def test_unknown_region_name():
    with pytest.raises(RegionError, match="unknown region 'antartica'.*antarctica, greenland"):
        load_region("antartica")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not JSON"),
        ('{"type": "Point", "coordinates": [0, 0]}', "type 'Point'.*Polygon or MultiPolygon"),
        ('{"type": "Feature", "geometry": null}', r"\$.geometry is missing or null"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}', "at least 3 distinct"),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [1, 1], [0, 0]]]}',
            r"coordinates\[0\]\[1\] must be \[longitude, latitude\]",
        ),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 95], [1, 1], [0, 0]]]}', "out of range"),
        (
            '{"type": "Polygon", "coordinates": '
            "[[[170, -60], [-170, -60], [-170, -70], [170, -60]]]}",
            "split polygons at the antimeridian",
        ),
        ('{"type": "FeatureCollection", "features": []}', "no polygons"),
        ('{"type": "MultiPolygon", "coordinates": 3}', "list of polygons"),
        ("[1, 2]", "must be an object"),
    ],
)
def test_malformed_geojson(tmp_path, text, message):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(RegionError, match=message):
        load_region(path)


def test_missing_region_file(tmp_path):
    with pytest.raises(RegionError, match="cannot read region file"):
        load_region(tmp_path / "nope.geojson")
