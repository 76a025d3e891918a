"""The synthetic ATL06 sample: deterministic, in NSIDC's layout, with consistent CMR records."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from magg_core.catalog.cmr import record_granule_name
from magg_core.cycles import cycle_range, parse_granule_name
from magg_core.granules.sample import (
    BEAMS,
    DEMO_CENTRE,
    FILL_VALUE,
    R007_PAGE_BYTES,
    node_time,
    planted_dhdt,
    planted_height,
    planted_surface,
    write_cycles,
    write_sample,
)
from tests import oracle

REALDATA = Path(__file__).parents[1] / "data" / "realdata"

NAME = re.compile(r"^ATL06_(\d{14})_(\d{4})(\d{2})(\d{2})_(\d{3})_(\d{2})\.h5$")
VARIABLES = {
    "latitude": np.float64,
    "longitude": np.float64,
    "h_li": np.float32,
    "h_li_sigma": np.float32,
    "atl06_quality_summary": np.int8,
    "delta_time": np.float64,
    "segment_id": np.int32,
}
EARTH_RADIUS_M = 6_371_008.8


def distance_m(lat1, lon1, lat2, lon2):
    """Great-circle distance (haversine), independent of the sample's vector maths."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = (
        np.sin((p2 - p1) / 2) ** 2
        + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(a))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("small"), n_granules=3, seed=5, extent_km=200.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    started = time.perf_counter()
    granules = write_sample(directory)
    return granules, time.perf_counter() - started


@pytest.fixture(scope="module")
def r007(tmp_path_factory):
    """The small sample in release 007's layout, as h5py writes it and after h5repack."""
    options = {"n_granules": 3, "seed": 5, "extent_km": 200.0, "layout": "r007"}
    return {
        "h5py": write_sample(tmp_path_factory.mktemp("r007"), **options),
        "h5repack": write_sample(tmp_path_factory.mktemp("r007p"), repack=True, **options),
    }


def test_same_seed_gives_identical_bytes_and_records(small, tmp_path):
    again = write_sample(tmp_path, n_granules=3, seed=5, extent_km=200.0)
    assert [g.name for g in again] == [g.name for g in small]
    for a, b in zip(small, again, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()
        assert a.umm == b.umm


def test_another_seed_gives_other_granules(small, tmp_path):
    other = write_sample(tmp_path, n_granules=3, seed=6, extent_km=200.0)
    assert {g.name for g in other} != {g.name for g in small}


def test_files_have_the_atl06_layout(small):
    for granule in small:
        raw = granule.path.read_bytes()
        assert raw[:8] == b"\x89HDF\r\n\x1a\n"
        assert raw[8] == 0, "superblock v0 (h5py's default libver): h5coro reads nothing newer"
        with h5py.File(granule.path, "r") as f:
            assert {"orbit_info", "ancillary_data"} <= set(f)
            for beam in (b for b in BEAMS if b in f):
                group = f[beam]["land_ice_segments"]
                assert set(group) == set(VARIABLES)
                n = group["latitude"].shape[0]
                assert n > 1000
                for name, dtype in VARIABLES.items():
                    dset = group[name]
                    assert dset.dtype == dtype, name
                    assert dset.shape == (n,)
                    assert dset.chunks == (min(10_000, n),)
                    assert dset.compression == "gzip" and dset.shuffle
                for name in ("h_li", "h_li_sigma"):
                    fill = group[name].attrs["_FillValue"]
                    assert fill.dtype == np.float32 and fill[0] == np.float32(3.4028235e38)
                    assert group[name].fillvalue == FILL_VALUE


@pytest.mark.parametrize("writer", ["h5py", "h5repack"])
def test_r007_files_have_the_cloud_optimized_layout(r007, writer):
    for granule in r007[writer]:
        assert granule.path.read_bytes()[8] == 2, "paged aggregation needs superblock v2"
        with h5py.File(granule.path, "r") as f:
            fcpl = f.id.get_create_plist()
            strategy, persist, _ = fcpl.get_file_space_strategy()
            assert strategy == h5py.h5f.FSPACE_STRATEGY_PAGE and persist
            assert fcpl.get_file_space_page_size() == R007_PAGE_BYTES
            tracked = h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED
            for beam in (b for b in BEAMS if b in f):
                group = f[beam]["land_ice_segments"]
                assert group.id.get_create_plist().get_link_creation_order() == tracked
                assert list(group) == list(VARIABLES), "links listed in creation order"
                assert group["delta_time"].is_scale
                for name, dtype in VARIABLES.items():
                    dset = group[name]
                    assert dset.dtype == dtype and dset.maxshape == (None,)
                    assert dset.chunks == (100_000,)
                    assert dset.compression == "gzip" and dset.shuffle
                    if name != "delta_time":
                        assert dset.dims[0][0] == group["delta_time"]


def test_r007_values_and_records_equal_r006_but_for_the_bytes(small, r007):
    for old, new in zip(small, r007["h5repack"], strict=True):
        assert old.name == new.name
        assert old.path.read_bytes() != new.path.read_bytes()
        with h5py.File(old.path, "r") as a, h5py.File(new.path, "r") as b:
            assert set(a) == set(b)
            for beam in (x for x in BEAMS if x in a):
                for name in VARIABLES:
                    path = f"{beam}/land_ice_segments/{name}"
                    np.testing.assert_array_equal(a[path][:], b[path][:])
        archive = new.umm["umm"]["DataGranule"]["ArchiveAndDistributionInformation"][0]
        assert archive["SizeInBytes"] == new.path.stat().st_size, (
            "the record is of the repacked file"
        )
        assert new.umm["umm"]["TemporalExtent"] == old.umm["umm"]["TemporalExtent"]


def test_r007_is_deterministic_through_h5repack(r007, tmp_path):
    again = write_sample(
        tmp_path, n_granules=3, seed=5, extent_km=200.0, layout="r007", repack=True
    )
    for a, b in zip(r007["h5repack"], again, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()


def test_values_are_plausible_and_include_fill_and_bad_rows(small):
    fills = bad = sigma_only = 0
    for granule in small:
        with h5py.File(granule.path, "r") as f:
            for beam in (b for b in BEAMS if b in f):
                g = f[beam]["land_ice_segments"]
                h, sigma = g["h_li"][:], g["h_li_sigma"][:]
                quality = g["atl06_quality_summary"][:]
                assert set(np.unique(quality)) <= {0, 1}
                ok = (h != FILL_VALUE) & (sigma != FILL_VALUE)
                assert np.all((sigma[ok] >= 0.02) & (sigma[ok] <= 0.5))
                assert np.all((h[ok] > 1000) & (h[ok] < 4000)), "an East Antarctic ice sheet"
                assert np.all(np.diff(g["segment_id"][:]) == 1)
                assert np.all(np.diff(g["delta_time"][:]) > 0)
                fills += int(np.sum(h == FILL_VALUE))
                sigma_only += int(np.sum((sigma == FILL_VALUE) & (h != FILL_VALUE)))
                bad += int(np.sum(quality == 1))
    assert fills > 0 and sigma_only > 0 and bad > 0


def test_beam_geometry_matches_icesat2(small):
    with h5py.File(small[0].path, "r") as f:

        def position(beam):
            g = f[beam]["land_ice_segments"]
            return g["latitude"][:], g["longitude"][:]

        lat, lon = position("gt2l")
        along = distance_m(lat[:-1], lon[:-1], lat[1:], lon[1:])
        assert np.allclose(along, 20.0, atol=0.1)
        for left, right in (("gt1l", "gt1r"), ("gt2l", "gt2r"), ("gt3l", "gt3r")):
            assert np.allclose(distance_m(*position(left), *position(right)), 90.0, atol=0.5)
        assert np.allclose(distance_m(*position("gt1l"), *position("gt2l")), 3300.0, atol=1.0)
        # The track runs nearly north-south at ~75.5°S on a 92° orbit.
        dlat, dlon = lat[-1] - lat[0], (lon[-1] - lon[0]) * np.cos(np.radians(lat.mean()))
        heading = np.degrees(np.arctan2(dlon, dlat)) % 360
        assert min(abs(heading - 188.5), abs(heading - 351.5)) < 3.0


def test_names_parse_and_agree_with_contents(small):
    start = cycle_range(22).start
    for granule in small:
        match = NAME.match(granule.name)
        assert match, granule.name
        stamp, rgt, cycle, region, version, revision = match.groups()
        begin = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        assert (cycle, version, revision) == ("22", "007", "01")
        assert region in ("10", "12")
        assert start <= begin < start + timedelta(days=91)
        with h5py.File(granule.path, "r") as f:
            assert int(f["orbit_info/rgt"][0]) == int(rgt)
            assert int(f["orbit_info/cycle_number"][0]) == 22
            first = f["gt1l/land_ice_segments/delta_time"][0]
        # delta_time: seconds since 2018-01-01T00:00:00 UTC (as real granules' data_start_utc).
        acquired = datetime(2018, 1, 1, tzinfo=UTC) + timedelta(seconds=float(first))
        assert abs((acquired - begin).total_seconds()) < 1.0


def test_exactly_one_granule_lacks_a_beam(small):
    missing = []
    for granule in small:
        with h5py.File(granule.path, "r") as f:
            missing.append(set(BEAMS) - set(f))
    assert [len(m) for m in missing] == [0, 1, 0]


def test_umm_records_look_like_cmr(small):
    for granule in small:
        item = granule.umm
        meta, umm = item["meta"], item["umm"]
        assert meta["provider-id"] == "NSIDC_CPRD"
        assert re.fullmatch(r"G\d{10}-NSIDC_CPRD", meta["concept-id"])
        assert meta["native-id"] == umm["GranuleUR"] == granule.name
        assert umm["CollectionReference"] == {"ShortName": "ATL06", "Version": "007"}
        when = umm["TemporalExtent"]["RangeDateTime"]
        assert (
            when["BeginningDateTime"][:19].replace("-", "").replace("T", "").replace(":", "")
            == (granule.name[6:20])
        )
        assert when["BeginningDateTime"] < when["EndingDateTime"]
        date = f"{granule.name[6:10]}/{granule.name[10:12]}/{granule.name[12:14]}"
        assert granule.s3_url == (
            f"s3://nsidc-cumulus-prod-protected/ATLAS/ATL06/007/{date}/{granule.name}"
        )
        assert granule.https_url == (
            "https://data.nsidc.earthdatacloud.nasa.gov/nsidc-cumulus-prod-protected/"
            f"ATLAS/ATL06/007/{date}/{granule.name}"
        )
        archive = umm["DataGranule"]["ArchiveAndDistributionInformation"][0]
        raw = granule.path.read_bytes()
        assert archive["SizeInBytes"] == len(raw)
        assert archive["Checksum"] == {"Value": hashlib.md5(raw).hexdigest(), "Algorithm": "MD5"}
        assert umm["DataGranule"]["ProductionDateTime"] > when["EndingDateTime"]


def test_footprint_is_closed_counter_clockwise_and_encloses_every_beam(small):
    for granule in small:
        polygons = granule.umm["umm"]["SpatialExtent"]["HorizontalSpatialDomain"]["Geometry"][
            "GPolygons"
        ]
        points = polygons[0]["Boundary"]["Points"]
        ring = np.array([(p["Longitude"], p["Latitude"]) for p in points])
        assert len(ring) >= 5
        assert np.array_equal(ring[0], ring[-1])
        x, y = ring[:, 0], ring[:, 1]  # far from the antimeridian: planar shoelace is valid
        assert np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0, "CMR wants counter-clockwise"
        outline = PolygonPath(ring)
        with h5py.File(granule.path, "r") as f:
            for beam in (b for b in BEAMS if b in f):
                g = f[beam]["land_ice_segments"]
                inside = outline.contains_points(np.c_[g["longitude"][:], g["latitude"][:]])
                assert inside.all(), beam


def test_default_demo_sample_is_sized_for_the_demo(demo):
    granules, seconds = demo
    assert 8 <= len(granules) <= 16
    total_mb = sum(g.path.stat().st_size for g in granules) / 1e6
    assert total_mb < 40
    assert seconds < 20
    points = oracle.good_points(g.path for g in granules)
    parent = points["cell"].to_numpy() >> 12
    granules_per_parent = defaultdict(set)
    for p, name in zip(parent, points["granule"], strict=True):
        granules_per_parent[p].add(name)
    assert 10 <= len(granules_per_parent) <= 30
    assert sum(len(v) >= 3 for v in granules_per_parent.values()) >= 3
    per_child = points.groupby("cell").size()
    assert per_child.median() >= 50, "enough points per child for meaningful quartiles"


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="latitude"):
        write_sample(tmp_path, centre=(-89.0, 0.0))
    with pytest.raises(ValueError, match="positive"):
        write_sample(tmp_path, n_granules=0)
    with pytest.raises(ValueError, match="passes"):
        write_sample(tmp_path, n_granules=500, extent_km=50.0)
    with pytest.raises(ValueError, match="'r008'"):
        write_sample(tmp_path, layout="r008")
    with pytest.raises(ValueError, match="r007 layout only"):
        write_sample(tmp_path, repack=True)
    with pytest.raises(ValueError, match="chunk_rows"):
        write_sample(tmp_path, layout="r007", chunk_rows=0)


def test_repack_without_h5repack_says_which_package_brings_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH on which h5repack is absent
    with pytest.raises(FileNotFoundError, match="hdf5-tools"):
        write_sample(tmp_path / "out", n_granules=1, layout="r007", repack=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # h5py alone still writes the paged layout
    [granule] = write_sample(tmp_path / "h5py", n_granules=1, layout="r007")
    assert granule.path.read_bytes()[8] == 2


# --- the multi-cycle sample with a planted height change ------------------------------


@pytest.fixture(scope="module")
def cycles(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cycles")
    started = time.perf_counter()
    written = write_cycles(directory)
    return written, time.perf_counter() - started


def beam_columns(path, beam="gt2l"):
    with h5py.File(path, "r") as f:
        g = f[beam]["land_ice_segments"]
        return {name: g[name][:] for name in VARIABLES}


def test_cycles_repeat_the_same_passes_91_days_apart(cycles):
    written, seconds = cycles
    assert list(written) == [20, 21, 22]
    assert seconds < 20
    first = written[20]
    assert len(first) == 12
    for cycle, granules in written.items():
        assert len(granules) == len(first)
        for g0, g in zip(first, granules, strict=True):
            m0, m = NAME.match(g0.name), NAME.match(g.name)
            assert m0 and m
            assert (m.group(2), m.group(4)) == (m0.group(2), m0.group(4)), "same RGT and region"
            assert m.group(3) == f"{cycle:02d}"
            assert g.name[20:25] + g.name[27:] == g0.name[20:25] + g0.name[27:]
            begin0 = datetime.strptime(m0.group(1), "%Y%m%d%H%M%S")
            begin = datetime.strptime(m.group(1), "%Y%m%d%H%M%S")
            assert begin - begin0 == timedelta(days=91 * (cycle - 20))
            track = g.umm["umm"]["SpatialExtent"]["HorizontalSpatialDomain"]["Track"]
            assert track["Cycle"] == cycle
            with h5py.File(g.path, "r") as f:
                assert int(f["orbit_info/cycle_number"][0]) == cycle


def test_repeat_passes_are_offset_across_track_by_tens_of_metres(cycles):
    written, _ = cycles
    offsets = []
    for g0, g in zip(written[20], written[22], strict=True):
        a, b = beam_columns(g0.path), beam_columns(g.path)
        np.testing.assert_array_equal(a["segment_id"], b["segment_id"])
        np.testing.assert_allclose(b["delta_time"] - a["delta_time"], 2 * 91 * 86400, atol=1e-3)
        apart = distance_m(a["latitude"], a["longitude"], b["latitude"], b["longitude"])
        assert np.ptp(apart) < 1.0, "a whole pass shifts by one offset"
        offsets.append(apart.mean())
    offsets = np.array(offsets)
    assert offsets.max() < 150 and np.std(offsets) > 5, f"offsets {offsets.round(1)}"


def test_heights_are_the_planted_surface_with_noise_and_unflagged_blunders(cycles):
    written, _ = cycles
    errors = []
    for granules in written.values():
        for g in granules[:4]:
            c = beam_columns(g.path, "gt1r")
            good = (c["atl06_quality_summary"] == 0) & (c["h_li"] != FILL_VALUE)
            truth = planted_height(c["latitude"], c["longitude"], c["delta_time"])
            errors.append(c["h_li"][good] - truth[good])
    error = np.abs(np.concatenate(errors))
    assert np.median(error) < 0.1
    blunders = np.mean(error > 4.0)
    assert 0.002 < blunders < 0.01, "about blunder_fraction = 0.5 % metres off, quality 0"


def test_planted_fields_have_a_steep_thinning_glacier():
    lat_c, lon_c = DEMO_CENTRE
    # Points on a grid of ±180 km around the centre.
    lat = lat_c + np.linspace(-1.6, 1.6, 161)[:, None] + 0 * np.arange(161)[None, :]
    lon = lon_c + np.linspace(-6.4, 6.4, 161)[None, :] + 0 * lat
    rate = planted_dhdt(lat, lon)
    assert set(np.unique(rate)) == {-0.5, 0.05}
    # Slope by finite differences of 100 m, east and north.
    d_lat = 100 / 111_195
    d_lon = d_lat / np.cos(np.radians(lat))
    slope = np.hypot(
        (planted_surface(lat, lon + d_lon) - planted_surface(lat, lon)) / 100,
        (planted_surface(lat + d_lat, lon) - planted_surface(lat, lon)) / 100,
    )
    assert np.median(slope[rate < 0]) > 0.02, "several percent on the glacier"
    assert np.median(slope[rate > 0]) < 0.01
    assert planted_height(lat_c, lon_c, 0.0) > 1000


def test_write_cycles_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="increasing"):
        write_cycles(tmp_path, cycles=(21, 20))
    with pytest.raises(ValueError, match="increasing"):
        write_cycles(tmp_path, cycles=())
    with pytest.raises(ValueError, match="blunder_fraction"):
        write_cycles(tmp_path, blunder_fraction=2.0)
    with pytest.raises(ValueError, match="latitude"):
        write_cycles(tmp_path, centre=(-89.0, 0.0))


@pytest.mark.parametrize(
    "name",
    [
        "ATL06_20181013235645_02340114_209_01.h5",  # tests/data/realdata/atl06
        None,  # the real NSIDC_ECS record of tests/data/realdata/cmr
    ],
)
def test_sample_dates_agree_with_real_granules(name):
    # One source for cycle dates: the sample flies RGT k of cycle c when ICESat-2 did.
    if name is None:
        page = json.loads((REALDATA / "cmr" / "earthaccess_atl06_umm.json").read_text())
        name = record_granule_name(page["items"][0])
    real = parse_granule_name(name)
    assert real.start - node_time(real.rgt, real.cycle) < timedelta(days=1)
    assert node_time(real.rgt, real.cycle) <= real.start
    assert cycle_range(real.cycle).start <= real.start < cycle_range(real.cycle).end
