"""Catalogs built from the sample's granules, through a loopback fake CMR."""

import copy
import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import h5py
import numpy as np
import pytest

from magg_core.catalog.catalog import (
    Catalog,
    CatalogError,
    build_catalog,
    catalog_from_records,
    load_catalog,
)
from magg_core.catalog.cmr import CmrError, GranuleSearch, RetryPolicy
from magg_core.catalog.regions import RegionError
from magg_core.cycles import CycleError, cycle_query_range
from magg_core.granules.sample import write_sample
from magg_core.morton import parent_of, point_morton
from magg_core.schema import ECS, CellRequest
from tests.fakes.cmr import FakeCmr, revision_of, umm_item

CYCLE = 22
ORDER = 6
FAST = RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=5.0)


@pytest.fixture(scope="module")
def dome_c(tmp_path_factory):
    """The demo sample: 12 granules near Dome C."""
    return write_sample(tmp_path_factory.mktemp("dome_c"), n_granules=12, cycle=CYCLE)


@pytest.fixture(scope="module")
def pole(tmp_path_factory):
    """Granules at 86°S on the antimeridian: tracks curve round the pole hole and cross ±180°."""
    return write_sample(
        tmp_path_factory.mktemp("pole"),
        n_granules=10,
        cycle=CYCLE,
        centre=(-86.0, 180.0),
        spacing_m=60.0,
    )


@pytest.fixture
def fake_cmr():
    fake = FakeCmr().start()
    yield fake
    fake.stop()


def point_cells(granule, order=ORDER):
    """Parent cell of every point (all rows, good or not) of a granule, per beam."""
    cells = []
    with h5py.File(granule.path) as f:
        for beam in (b for b in f if b.startswith("gt")):
            segments = f[beam]["land_ice_segments"]
            words = point_morton(segments["latitude"][:], segments["longitude"][:], 18)
            cells.append(parent_of(words, order))
    return np.unique(np.concatenate(cells))


def overlap_check(catalog, granules, order=ORDER):
    """(missed, extra, pairs) of (granule, cell) pairs against the granules' own points."""
    listed = {(g.name, cell) for cell, gs in catalog.cells.items() for g in gs}
    truth = {(g.name, int(c)) for g in granules for c in point_cells(g, order)}
    return len(truth - listed), len(listed - truth), len(listed)


def test_catalog_lists_every_granule_under_every_cell_its_points_fall_in(dome_c):
    catalog = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)
    missed, extra, pairs = overlap_check(catalog, dome_c)
    assert missed == 0
    assert extra <= 0.1 * pairs  # cells the footprint's 150 m margin grazes
    assert catalog.granule_count == 12 and not catalog.report


def test_completeness_where_tracks_wrap_the_pole_and_cross_the_antimeridian(pole):
    rings = [
        g.umm["umm"]["SpatialExtent"]["HorizontalSpatialDomain"]["Geometry"]["GPolygons"][0]
        for g in pole
    ]
    lons = np.array([p["Longitude"] for r in rings for p in r["Boundary"]["Points"]])
    assert lons.min() < -179 and lons.max() > 179  # really crosses the antimeridian
    catalog = catalog_from_records([g.umm for g in pole], cycle=CYCLE)
    missed, extra, pairs = overlap_check(catalog, pole)
    assert missed == 0
    assert extra <= 0.1 * pairs
    # At a finer parent order the same holds with many more cells per granule.
    fine = catalog_from_records([g.umm for g in pole], cycle=CYCLE, parent_order=9)
    missed9, extra9, pairs9 = overlap_check(fine, pole, 9)
    assert missed9 == 0 and extra9 <= 0.1 * pairs9


def test_build_from_fake_cmr_matches_the_records_path(dome_c, fake_cmr, tmp_path):
    start = cycle_query_range(CYCLE).start + timedelta(days=20)
    other_cycle = umm_item(  # inside the padded dates, but its name says cycle 21
        f"ATL06_{start:%Y%m%d%H%M%S}_04402110_007_01.h5",
        [(123, -75), (124, -75), (124, -74), (123, -75)],
        start,
        start + timedelta(minutes=5),
    )
    fake_cmr.items = [g.umm for g in dome_c] + [other_cycle]
    catalog = build_catalog(cycle=CYCLE, region="antarctica", cmr_url=fake_cmr.url, retry=FAST)
    assert (
        catalog.fingerprint
        == catalog_from_records([g.umm for g in dome_c], cycle=CYCLE).fingerprint
    )
    meta = catalog.metadata
    assert meta["counts"]["other_cycle"] == 1
    assert meta["counts"]["records"] == 13 and meta["counts"]["granules"] == 12
    assert (meta["cycle"], meta["region"], meta["parent_order"]) == (CYCLE, "antarctica", ORDER)
    assert meta["query"]["cmr_url"] == fake_cmr.url
    assert meta["query"]["bounding_box"][1] == -90.0
    assert (meta["start"], meta["end"]) == cycle_query_range(CYCLE).isoformat()

    # Each cell becomes a valid cell request for the workers.
    path = catalog.write(tmp_path / "catalog.json")
    loaded = load_catalog(path)
    for parent in loaded.parents:
        request = CellRequest.from_event(
            {
                "parent_morton": str(parent),
                "parent_order": ORDER,
                "child_order": 12,
                "granule_urls": [g.s3 for g in loaded.cells[parent]],
                "store_path": "s3://bucket/store.zarr",
            },
            ECS,
        )
        assert request.granule_urls and all(u.startswith("s3://") for u in request.granule_urls)


def test_catalog_file_layout(dome_c, tmp_path):
    catalog = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)
    data = json.loads(catalog.write(tmp_path / "c.json").read_text())
    keys = list(data["cells"])
    assert [int(k) for k in keys] == sorted(int(k) for k in keys)  # numeric, not string, order
    assert all(int(k) >= 2**63 for k in keys)  # uint64 words survive as strings
    assert data["granule_counts"] == {k: len(v) for k, v in data["cells"].items()}
    by_name = {g.name: g for g in dome_c}
    for granules in data["cells"].values():
        for g in granules:
            assert g["s3"] == by_name[g["name"]].s3_url
            assert g["https"] == by_name[g["name"]].https_url
    assert data["metadata"]["fingerprint"] == catalog.fingerprint
    assert data["metadata"]["counts"]["pairs"] == sum(data["granule_counts"].values())
    assert data["report"] == []


def test_round_trip_and_fingerprint(dome_c, tmp_path):
    catalog = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)
    loaded = load_catalog(catalog.write(tmp_path / "c.json"))
    assert loaded.cells == catalog.cells
    assert loaded.metadata == catalog.metadata
    assert np.array_equal(loaded.parents, catalog.parents) and loaded.parents.dtype == np.uint64
    # Same granules, built again later: same fingerprint; one granule fewer: different.
    again = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)
    assert again.fingerprint == catalog.fingerprint
    fewer = catalog_from_records([g.umm for g in dome_c[1:]], cycle=CYCLE)
    assert fewer.fingerprint != catalog.fingerprint


def test_edited_or_truncated_catalog_is_rejected(dome_c, tmp_path):
    path = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE).write(tmp_path / "c.json")
    data = json.loads(path.read_text())
    first = next(iter(data["cells"]))
    data["cells"][first] = data["cells"][first][:-1]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match="fingerprint"):
        load_catalog(edited)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(CatalogError, match="not JSON"):
        load_catalog(truncated)
    data = json.loads(path.read_text())
    data["cells"] = dict(reversed(list(data["cells"].items())))
    unordered = tmp_path / "unordered.json"
    unordered.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match="ascending"):
        load_catalog(unordered)


def test_write_is_atomic(dome_c, tmp_path, monkeypatch):
    catalog = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)
    path = catalog.write(tmp_path / "c.json")
    before = path.read_bytes()

    def fail_midway(obj, f, **kw):
        f.write('{"metadata": {')
        raise OSError("disk full")

    monkeypatch.setattr("magg_core.catalog.catalog.json.dump", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        catalog_from_records([g.umm for g in dome_c[:3]], cycle=CYCLE).write(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no temporary left


def test_missing_and_degenerate_footprints_are_reported_not_dropped(dome_c):
    t = datetime(2024, 1, 10, tzinfo=UTC)
    names = [
        f"ATL06_{t + timedelta(hours=i):%Y%m%d%H%M%S}_0{100 + i}2210_007_01.h5" for i in range(4)
    ]
    bad = [
        umm_item(names[0], None, t, t),  # no GPolygons at all
        umm_item(names[1], [(123, -75), (124, -75), (123, -75)], t, t),  # two distinct vertices
        umm_item(names[2], [(123, -75), (124, -95), (124, -74), (123, -75)], t, t),  # latitude -95
        umm_item(names[3], [(123, -75), (124, -75), (124, -74), (123, -75)], t, t),
    ]
    bad[3]["umm"]["RelatedUrls"] = bad[3]["umm"]["RelatedUrls"][1:]  # https only
    catalog = catalog_from_records([g.umm for g in dome_c] + bad, cycle=CYCLE)
    problems = {r.name: r.problem for r in catalog.report}
    assert problems == {
        names[0]: "missing_footprint",
        names[1]: "degenerate_footprint",
        names[2]: "degenerate_footprint",
        names[3]: "no_s3_url",
    }
    assert "out of range" in next(r.detail for r in catalog.report if r.name == names[2])
    assert catalog.metadata["counts"]["reported"] == 4
    assert catalog.granule_count == 12
    written = catalog.to_dict()["report"]
    assert {r["name"] for r in written} == set(names)


def test_granules_outside_the_region_are_counted(dome_c):
    t = datetime(2024, 1, 10, tzinfo=UTC)
    greenland = umm_item(
        "ATL06_20240110000000_01002203_007_01.h5",
        [(-40, 72), (-39, 72), (-39, 73), (-40, 72)],
        t,
        t,
    )
    catalog = catalog_from_records([g.umm for g in dome_c] + [greenland], cycle=CYCLE)
    assert catalog.metadata["counts"]["outside_region"] == 1
    assert catalog.granule_count == 12
    in_greenland = catalog_from_records([greenland], region="greenland", cycle=CYCLE)
    assert in_greenland.granule_count == 1


def test_date_range_catalog_keeps_all_cycles(dome_c, fake_cmr):
    fake_cmr.items = [g.umm for g in dome_c]
    first = min(
        g.umm["umm"]["TemporalExtent"]["RangeDateTime"]["BeginningDateTime"] for g in dome_c
    )
    catalog = build_catalog(start=first[:10], end=first[:10], cmr_url=fake_cmr.url, retry=FAST)
    assert catalog.metadata["cycle"] is None
    assert catalog.metadata["start"] == first[:10] + "T00:00:00Z"
    assert 1 <= catalog.granule_count < 12


def test_empty_result_is_a_clear_no_granules_outcome(fake_cmr, tmp_path):
    catalog = build_catalog(cycle=CYCLE, cmr_url=fake_cmr.url, retry=FAST)
    assert catalog.is_empty and catalog.granule_count == 0
    assert catalog.metadata["counts"]["granules"] == 0
    assert load_catalog(catalog.write(tmp_path / "empty.json")).is_empty


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"cycle": 0}, CycleError, "before launch"),
        ({"cycle": 22, "start": "2023-01-01", "end": "2023-02-01"}, CycleError, "not both"),
        ({}, CycleError, "give a cycle"),
        ({"start": "2023-01-01"}, CycleError, "both a start and an end"),
        ({"cycle": 22, "region": "antartica"}, RegionError, "unknown region"),
        ({"cycle": 22, "parent_order": 0}, CatalogError, "parent_order"),
    ],
)
def test_bad_input_fails_before_asking_cmr(fake_cmr, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_catalog(cmr_url=fake_cmr.url, retry=FAST, **kwargs)
    assert fake_cmr.requests == []


def test_malformed_geojson_region_fails_before_asking_cmr(fake_cmr, tmp_path):
    path = tmp_path / "region.geojson"
    path.write_text('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0]]]}')
    with pytest.raises(RegionError, match="at least 3 distinct"):
        build_catalog(cycle=CYCLE, region=path, cmr_url=fake_cmr.url, retry=FAST)
    assert fake_cmr.requests == []


def test_catalog_is_a_frozen_value():
    catalog = Catalog(metadata={"parent_order": 6}, cells={})
    with pytest.raises(AttributeError):
        catalog.cells = {}
    assert catalog.is_empty and catalog.parents.dtype == np.uint64


# --- each granule exactly once --------------------------------------------------------


def https_only(item: dict, provider: str = "NSIDC_CPRD") -> dict:
    """The same granule's record as a provider without direct S3 access lists it."""
    record = copy.deepcopy(item)
    record["meta"]["provider-id"] = provider
    # CMR gives each record its own concept id, ending in the provider's name
    record["meta"]["concept-id"] = record["meta"]["concept-id"].replace("-", "0-", 1)
    record["umm"]["RelatedUrls"] = [
        u for u in record["umm"]["RelatedUrls"] if u["Type"] != "GET DATA VIA DIRECT ACCESS"
    ]
    return record


def granule_lists(catalog) -> dict[int, list[str]]:
    return {cell: [g.name for g in granules] for cell, granules in catalog.cells.items()}


def release_of(item: dict, version: str) -> dict:
    """The record of the same acquisition in another release (its name, path and collection)."""
    old = item["umm"]["GranuleUR"]
    new = old.replace("_007_", f"_{version}_")
    record = json.loads(json.dumps(item).replace(old, new).replace("/007/", f"/{version}/"))
    record["umm"]["CollectionReference"]["Version"] = version
    record["meta"]["concept-id"] = record["meta"]["concept-id"].replace("-", f"{version}-", 1)
    return record


def test_a_catalog_keeps_its_release_and_reports_the_others(dome_c):
    records = [g.umm for g in dome_c]
    older = [release_of(r, "006") for r in records[:3]]
    names_006 = {r["umm"]["GranuleUR"] for r in older}
    only_007 = catalog_from_records(records, cycle=CYCLE)

    catalog = catalog_from_records(older + records, cycle=CYCLE, search=GranuleSearch())
    assert granule_lists(catalog) == granule_lists(only_007)
    assert {r.name for r in catalog.report if r.problem == "other_release"} == names_006
    assert catalog.metadata["counts"]["other_release"] == 3

    chosen = catalog_from_records(older + records, cycle=CYCLE, search=GranuleSearch(version="006"))
    assert {g.name for gs in chosen.cells.values() for g in gs} == names_006

    with pytest.raises(CatalogError, match=r"releases 006, 007 of one acquisition \(ATL06_"):
        catalog_from_records(records + older, cycle=CYCLE)  # which one, the records do not say


def test_only_the_highest_revision_of_an_acquisition_is_catalogued(dome_c, fake_cmr):
    one, other = dome_c[0].umm, dome_c[5].umm
    one_02, other_02, other_03 = (
        revision_of(one, "02"),
        revision_of(other, "02"),
        revision_of(other, "03"),
    )
    # Newer revisions served first, across short pages: neither order nor paging matters.
    fake_cmr.items = [other_03, one_02] + [g.umm for g in dome_c] + [other_02]
    fake_cmr.page_limit = 4
    catalog = build_catalog(cycle=CYCLE, cmr_url=fake_cmr.url, retry=FAST)

    newest = {dome_c[0].name: one_02, dome_c[5].name: other_03}
    renamed = {old: item["umm"]["GranuleUR"] for old, item in newest.items()}
    single = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)
    expected = {
        cell: [renamed.get(name, name) for name in names]
        for cell, names in granule_lists(single).items()
    }
    assert granule_lists(catalog) == expected
    assert catalog.cells[next(iter(expected))][0].s3.endswith(expected[next(iter(expected))][0])
    superseded = {r.name: r.detail for r in catalog.report if r.problem == "superseded"}
    assert superseded.keys() == {dome_c[0].name, dome_c[5].name, other_02["umm"]["GranuleUR"]}
    assert renamed[dome_c[0].name] in superseded[dome_c[0].name]
    assert renamed[dome_c[5].name] in superseded[other_02["umm"]["GranuleUR"]]
    counts = catalog.metadata["counts"]
    assert (counts["records"], counts["superseded"], counts["granules"]) == (15, 3, 12)
    assert catalog.to_dict()["report"] == [
        {"name": r.name, "problem": r.problem, "detail": r.detail} for r in catalog.report
    ]


def test_a_granule_listed_twice_is_kept_once_with_its_s3_url_whatever_the_order(dome_c):
    records = [g.umm for g in dome_c]
    reference = catalog_from_records(records, cycle=CYCLE)
    listed_twice = dome_c[3].umm
    for extra in (https_only(listed_twice, "NSIDC_ECS"), listed_twice):
        for order in (records + [extra], [extra] + records, records[3:] + [extra] + records[:3]):
            catalog = catalog_from_records(order, cycle=CYCLE)
            assert catalog.fingerprint == reference.fingerprint
            assert catalog.report == ()
            assert catalog.metadata["counts"]["duplicates"] == 1


def test_a_duplicate_record_from_cmr_pages_is_gridded_once(dome_c, fake_cmr):
    records = [g.umm for g in dome_c]
    listed_twice = dome_c[7].umm
    again = copy.deepcopy(listed_twice)  # a second record of the granule: its own concept id
    again["meta"]["concept-id"] = again["meta"]["concept-id"].replace("-", "1-", 1)
    fake_cmr.items = [https_only(listed_twice)] + records + [again]
    fake_cmr.page_limit = 5  # the three records of one granule on three pages
    catalog = build_catalog(cycle=CYCLE, cmr_url=fake_cmr.url, retry=FAST)
    assert granule_lists(catalog) == granule_lists(catalog_from_records(records, cycle=CYCLE))
    assert catalog.metadata["counts"]["duplicates"] == 2 and catalog.report == ()
    for cell in catalog.parents:
        urls = [g.s3 for g in catalog.cells[cell]]
        assert len(urls) == len(set(urls)) and all(u.startswith("s3://") for u in urls)


def test_one_file_under_two_names_is_listed_once(dome_c):
    """A record whose name is not the file's (another id for the same s3 object)."""
    records = [g.umm for g in dome_c]
    alias = copy.deepcopy(dome_c[2].umm)
    alias["umm"]["GranuleUR"] = alias["meta"]["native-id"] = "SC:ATL06.007:276351244"
    for order in (records + [alias], [alias] + records):
        catalog = catalog_from_records(order)  # a date-range catalog: no cycle filter
        assert catalog.fingerprint == catalog_from_records(records).fingerprint
        assert catalog.metadata["counts"]["duplicates"] == 1


def test_a_record_whose_name_is_a_path_is_reported_not_catalogued(dome_c):
    sneaky = copy.deepcopy(dome_c[1].umm)
    sneaky["umm"]["GranuleUR"] = "../../" + dome_c[1].name
    catalog = catalog_from_records([g.umm for g in dome_c[2:]] + [sneaky], cycle=CYCLE)
    assert [(r.name, r.problem) for r in catalog.report] == [
        (sneaky["umm"]["GranuleUR"], "unrecognised_name")
    ]
    assert catalog.granule_count == 10


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "s3://bucket-only"])
def test_a_record_whose_direct_access_url_is_not_s3_is_reported(dome_c, url):
    record = copy.deepcopy(dome_c[4].umm)
    for link in record["umm"]["RelatedUrls"]:
        if link["Type"] == "GET DATA VIA DIRECT ACCESS":
            link["URL"] = url
    catalog = catalog_from_records([g.umm for g in dome_c[5:]] + [record], cycle=CYCLE)
    assert [(r.name, r.problem) for r in catalog.report] == [(dome_c[4].name, "no_s3_url")]
    assert catalog.granule_count == 7


def test_overlapping_cmr_pages_neither_double_nor_hide_a_granule(dome_c, fake_cmr):
    fake_cmr.items = [g.umm for g in dome_c]
    fake_cmr.page_limit = 4
    fake_cmr.overlap = 1  # page 2 repeats page 1's last record
    catalog = build_catalog(cycle=CYCLE, cmr_url=fake_cmr.url, retry=FAST)
    single = catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)
    assert granule_lists(catalog) == granule_lists(single)
    assert catalog.metadata["counts"]["duplicates"] == 0  # the repeat never reached it
    fake_cmr.unserved_hits = 1  # one record never served: the repeat must not stand for it
    with pytest.raises(CmrError, match="but 12 were received, and 1 repeats"):
        build_catalog(cycle=CYCLE, cmr_url=fake_cmr.url, retry=FAST)


def test_a_short_cmr_page_no_longer_shortens_the_catalog(dome_c, fake_cmr):
    fake_cmr.items = [g.umm for g in dome_c[:6]]
    fake_cmr.page_limit = 4  # was: 4 of 6 granules, silently
    catalog = build_catalog(cycle=CYCLE, cmr_url=fake_cmr.url, retry=FAST)
    assert catalog.granule_count == 6
    fake_cmr.unserved_hits = 1
    with pytest.raises(CmrError, match="CMR-Hits says 7 granules but 6 were received"):
        build_catalog(cycle=CYCLE, cmr_url=fake_cmr.url, retry=FAST)


# --- what a catalog file may hold -----------------------------------------------------


@pytest.fixture
def clean(dome_c):
    return catalog_from_records([g.umm for g in dome_c], cycle=CYCLE)


def write_cells(tmp_path, catalog, cells, parent_order=ORDER):
    """A catalog file with these cells and a fingerprint that matches them."""
    metadata = {**catalog.metadata, "parent_order": parent_order}
    return Catalog(metadata=metadata, cells=cells).write(tmp_path / "edited.json")


def busiest(catalog):
    return max(catalog.cells, key=lambda c: len(catalog.cells[c]))


def test_a_file_listing_a_granule_twice_in_a_cell_is_rejected(clean, tmp_path):
    cell = busiest(clean)
    first, second = clean.cells[cell][:2]
    twice = {**clean.cells, cell: (first, first, second)}
    with pytest.raises(CatalogError, match=rf"cells\[{cell}\] lists granule '{first.name}' twice"):
        load_catalog(write_cells(tmp_path, clean, twice))
    renamed = replace(second, name="ATL06_copy.h5", s3=first.s3)
    same_url = {**clean.cells, cell: (first, renamed)}
    with pytest.raises(CatalogError, match=rf"cells\[{cell}\] lists granule 'ATL06_copy.h5' tw"):
        load_catalog(write_cells(tmp_path, clean, same_url))


@pytest.mark.parametrize(
    "spelling",
    [
        lambda url: url.replace("/ATLAS/", "//ATLAS/"),  # s3://b//k is s3://b/k
        lambda url: url.replace("/ATLAS/", "/./ATLAS/"),
        lambda url: url + "/.",  # the file name differs, the object does not
    ],
)
def test_a_file_listing_one_s3_object_under_two_spellings_is_rejected(clean, tmp_path, spelling):
    cell = busiest(clean)
    first, second = clean.cells[cell][:2]
    # another name, another https URL, the same object: it would be read twice
    alias = replace(second, name="ATL06_alias.h5", s3=spelling(first.s3), https=None)
    cells = {**clean.cells, cell: (first, alias)}
    with pytest.raises(CatalogError, match=rf"cells\[{cell}\] lists granule 'ATL06_alias.h5' tw"):
        load_catalog(write_cells(tmp_path, clean, cells))


def test_a_file_with_two_releases_of_one_acquisition_is_rejected(clean, tmp_path):
    cell_a, cell_b = list(clean.cells)[:2]
    granule = clean.cells[cell_a][0]
    other = granule.name.replace("_007_01.h5", "_006_01.h5")
    assert other != granule.name
    older = replace(granule, name=other, s3=granule.s3.replace(granule.name, other), https=None)
    cells = {**clean.cells, cell_b: (*clean.cells[cell_b], older)}
    with pytest.raises(CatalogError, match="two revisions or releases of one acquisition"):
        load_catalog(write_cells(tmp_path, clean, cells))


def test_a_file_with_two_revisions_of_one_acquisition_is_rejected(clean, tmp_path):
    cell_a, cell_b = list(clean.cells)[:2]
    granule = clean.cells[cell_a][0]
    newer_name = granule.name.replace("_01.h5", "_02.h5")
    newer = replace(granule, name=newer_name, s3=granule.s3.replace("_01.h5", "_02.h5"))
    cells = {**clean.cells, cell_b: (*clean.cells[cell_b], newer)}
    with pytest.raises(CatalogError) as info:
        load_catalog(write_cells(tmp_path, clean, cells))
    message = str(info.value)
    assert f"cells[{cell_b}] granule {newer_name!r}" in message
    assert f"cells[{cell_a}] granule {granule.name!r}" in message
    assert "two revisions or releases of one acquisition" in message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("s3", "/etc/passwd", "s3 URL '/etc/passwd' is not s3://bucket/key"),
        ("s3", "file:///etc/passwd", "s3 URL 'file:///etc/passwd' is not s3://"),
        ("s3", "https://data.nsidc.earthdatacloud.nasa.gov/x.h5", "s3 URL 'https://"),
        ("s3", "s3://bucket-only", "is not s3://bucket/key"),
        ("s3", "s3:///no-bucket.h5", "is not s3://bucket/key"),
        ("https", "file:///etc/passwd", "https URL 'file:///etc/passwd' is not https://"),
        ("https", "http://data.nsidc.earthdatacloud.nasa.gov/x.h5", "https URL 'http://"),
        ("https", "/etc/passwd", "https URL '/etc/passwd'"),
        ("name", "../../etc/passwd", "granule name '../../etc/passwd' is not a plain file name"),
        ("name", "sub/x.h5", "granule name 'sub/x.h5' is not a plain file name"),
    ],
)
def test_a_file_pointing_a_worker_anywhere_but_s3_is_rejected(
    clean, tmp_path, field, value, message
):
    cell = busiest(clean)
    bad = replace(clean.cells[cell][1], **{field: value})
    cells = {**clean.cells, cell: (clean.cells[cell][0], bad, *clean.cells[cell][2:])}
    with pytest.raises(CatalogError) as info:
        load_catalog(write_cells(tmp_path, clean, cells))
    text = str(info.value)
    assert f"cells[{cell}]" in text and message in text
    if field != "name":
        assert repr(bad.name) in text


def order6(lat=-75.0, lon=123.0, order=ORDER) -> int:
    return int(parent_of(point_morton(np.array([lat]), np.array([lon]), 18), order)[0])


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (order6(order=7), "is a morton word of order 7, not of order 6"),
        (order6(order=5), "is a morton word of order 5, not of order 6"),
        (12345, "is not a morton word"),
        (0, "is not a morton word"),
        (2**64 - 1, "is not a morton word"),
        (order6() | 1 << 20, f"is not a canonical morton word (the cell's word is {order6()})"),
        ((order6() & ~0x3F) | 48, "is a morton word of order 29"),  # a point, not a cell
    ],
)
def test_a_cell_key_that_is_no_word_of_the_parent_order_is_rejected(clean, tmp_path, key, reason):
    cells = dict(clean.cells)
    cells[key] = cells.pop(busiest(clean))
    with pytest.raises(CatalogError, match=re.escape(f"cell key {key} {reason}")):
        load_catalog(write_cells(tmp_path, clean, dict(sorted(cells.items()))))


def test_a_file_whose_words_are_of_its_own_order_loads(clean, tmp_path):
    """The order the words are checked at is the file's parent_order, not always 6."""
    cells = {order6(order=7): clean.cells[busiest(clean)]}
    loaded = load_catalog(write_cells(tmp_path, clean, cells, parent_order=7))
    assert list(loaded.cells) == [order6(order=7)]
    with pytest.raises(CatalogError, match="metadata.parent_order must be an integer"):
        load_catalog(write_cells(tmp_path, clean, cells, parent_order=None))
