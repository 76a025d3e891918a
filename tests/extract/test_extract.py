"""Two stages, extract per granule then grid per cell, against the one-stage path and the oracle."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import load_config
from magg_core.extract.granule import extract_granule
from magg_core.granules.sample import BEAMS, write_sample
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import plan_cells, plan_extracts
from magg_core.height_change.plan import HeightChangePlanError, scan_cycle_store
from magg_core.morton import parent_of, point_morton
from magg_core.schema import OPERATOR, ExtractRequest
from magg_core.store.arrays import create_template, open_store
from magg_core.store.fragments import decode, fragment_key, read_extract_record
from magg_core.store.records import read_records
from tests import oracle

CONFIG = load_config()
STATS = [s.name for s in CONFIG.aggregation.statistics]
USED = ("latitude", "longitude", "h_li", "h_li_sigma", "atl06_quality_summary")
BYTES_A_POINT = 2 + 4 + 4
"""child (uint16), h_li and h_li_sigma (float32): what a run not keeping fragments for
height change stores, though the built-in config has a ``height_change`` section."""
NPZ_OVERHEAD = 2048
"""Bytes a fragment adds besides its points: the .npz's headers for five entries
(child, two variables, two dropped counts)."""
HEIGHT_CHANGE_BYTES = 3 * 8
"""latitude, longitude and time (float64), added when fragments are kept for height change."""


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Long tracks: each granule crosses many parents, the case two stages are for."""
    directory = tmp_path_factory.mktemp("extract")
    granules = write_sample(directory / "granules", n_granules=6, extent_km=600.0, seed=5)
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    return directory, granules, catalog


def _store(url, catalog):
    store = open_store(url)
    create_template(store, CONFIG, catalog.parents, {"test": True})
    return store


def _requests(sample, url):
    directory, _, catalog = sample
    return plan_cells(catalog, CONFIG, url, granule_mirror=str(directory / "granules"))


def _chunks(store):
    group = zarr.open_group(store, path="12", mode="r")
    return {name: group[name][:].tobytes() for name in STATS}


@pytest.fixture(scope="module")
def two_stage(sample, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("two") / "atl06.zarr")
    store = _store(url, sample[2])
    requests = _requests(sample, url)
    extracts = {e.granule_url: extract_granule(e) for e in plan_extracts(requests)}
    cells = {r.parent_morton: process_cell(replace(r, from_fragments=True)) for r in requests}
    return url, store, requests, extracts, cells


def test_two_stages_write_the_same_bytes_as_one(sample, two_stage, tmp_path):
    _, store, requests, _, cells = two_stage
    one = _store(str(tmp_path / "one.zarr"), sample[2])
    for request in _requests(sample, str(tmp_path / "one.zarr")):
        assert process_cell(request).status == cells[request.parent_morton].status
    assert _chunks(store) == _chunks(one)


def test_two_stages_equal_the_oracle(sample, two_stage):
    _, granules, catalog = sample
    _, store, requests, _, cells = two_stage
    expected = oracle.reference_statistics([g.path for g in granules])
    group = zarr.open_group(store, path="12", mode="r")
    n = CONFIG.output.children_per_parent
    for request in requests:
        want = expected.get(request.parent_morton)
        got = group["count"][request.chunk_idx * n : (request.chunk_idx + 1) * n]
        if want is None:
            assert not got.any()
            continue
        np.testing.assert_array_equal(got, want["count"])
        assert cells[request.parent_morton].status == "ok"


def test_each_granule_is_read_once_and_no_more_than_its_variables(sample, two_stage):
    """Bytes fetched per granule <= 1.2x the compressed chunks of the datasets used."""
    _, granules, _ = sample
    _, _, requests, extracts, _ = two_stage
    crossings = [len(e.parents) for e in plan_extracts(requests)]
    assert np.mean(crossings) >= 3, "a granule crosses several cells"
    for granule in granules:
        with h5py.File(granule.path) as f:
            stored = sum(
                f[f"{b}/land_ice_segments/{name}"].id.get_storage_size()
                for b in BEAMS
                if b in f
                for name in USED
            )
        result = extracts[str(granule.path)]
        assert result.status == "ok" and not result.reused
        assert stored < result.bytes_fetched <= 1.2 * stored, granule.name
        assert result.bytes_written <= BYTES_A_POINT * result.points + 2048 * result.parents


def test_an_extract_already_in_the_store_is_not_read_again(two_stage):
    _, _, requests, extracts, _ = two_stage
    again = extract_granule(plan_extracts(requests)[0])
    assert again.reused and again.bytes_fetched == 0
    assert again.points == extracts[again.url].points


def test_a_granule_that_cannot_be_read_makes_its_cells_partial(sample, tmp_path):
    directory, granules, catalog = sample
    url = str(tmp_path / "broken.zarr")
    store = _store(url, catalog)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for g in granules:
        (mirror / g.name).write_bytes(g.path.read_bytes())
    broken = granules[0].name
    (mirror / broken).write_bytes(b"not an HDF5 file at all" * 100)
    requests = plan_cells(catalog, CONFIG, url, granule_mirror=str(mirror))
    results = {e.granule_url: extract_granule(e) for e in plan_extracts(requests)}

    failed = results[str(mirror / broken)]
    assert failed.status == "failed" and "not an HDF5 file" in failed.reason
    assert read_extract_record(store, CONFIG, str(mirror / broken)).status == "failed"
    touched = [r for r in requests if str(mirror / broken) in r.granule_urls]
    assert touched
    for request in touched:
        result = process_cell(replace(request, from_fragments=True))
        expected = "partial" if len(request.granule_urls) > 1 else "failed"
        assert result.status == expected
        assert [f.reason for f in result.files_failed] == [failed.reason]
    records = read_records(store, CONFIG)
    assert {records[r.parent_morton].result.status for r in touched} <= {"partial", "failed"}


def test_a_cell_whose_granule_was_never_extracted_is_not_complete(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "missing.zarr")
    store = _store(url, catalog)
    request = max(_requests(sample, url), key=lambda r: len(r.granule_urls))
    result = process_cell(replace(request, from_fragments=True))
    assert result.status == "failed"
    assert {f.reason for f in result.files_failed} == {"granule was not extracted"}
    assert not Path(
        url, fragment_key(CONFIG, request.granule_urls[0], request.parent_morton)
    ).exists()
    assert read_records(store, CONFIG)[request.parent_morton].result.status == "failed"


def test_on_the_demo_sample_two_stages_write_the_same_bytes_as_one(tmp_path):
    """``magg demo``'s sample (12 granules near Dome C, 19 cells), both ways."""
    granules = write_sample(tmp_path / "granules")
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    sample = (tmp_path, granules, catalog)
    one, two = (str(tmp_path / f"{name}.zarr") for name in ("one", "two"))
    stores = {url: _store(url, catalog) for url in (one, two)}
    for request in _requests(sample, one):
        process_cell(request)
    requests = _requests(sample, two)
    for extract in plan_extracts(requests):
        assert extract_granule(extract).status == "ok"
    for request in requests:
        process_cell(replace(request, from_fragments=True))
    assert _chunks(stores[one]) == _chunks(stores[two])


# --- what a fragment carries ---------------------------------------------------------


def _fragment_arrays(store, url, parent):
    data = store_bytes(store, fragment_key(CONFIG, url, parent))
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def store_bytes(store, key):
    return sync(store.get(key, prototype=default_buffer_prototype())).to_bytes()


def test_without_keeping_for_height_change_a_fragment_holds_the_variables_only(two_stage):
    """The built-in config has a height_change section; a plain run still stores 10 B a point."""
    _, store, requests, extracts, _ = two_stage
    extract = plan_extracts(requests)[0]
    assert not extract.height_change
    record = read_extract_record(store, CONFIG, extract.granule_url)
    assert list(record.columns) == ["h_li", "h_li_sigma"]
    parent = max(record.points, key=lambda p: record.points[p])
    arrays = _fragment_arrays(store, extract.granule_url, int(parent))
    assert sorted(arrays) == ["child", "dropped.fill", "dropped.quality", "h_li", "h_li_sigma"]
    assert arrays["child"].size == record.points[parent] > 0
    result = extracts[extract.granule_url]
    assert result.bytes_written <= BYTES_A_POINT * result.points + NPZ_OVERHEAD * result.parents


def test_such_fragments_are_refused_by_height_change_by_name(two_stage):
    url = two_stage[0]
    with pytest.raises(HeightChangePlanError, match="without latitude, longitude and time"):
        scan_cycle_store(22, url, CONFIG)


def test_keeping_for_height_change_adds_coordinates_and_time_and_reads_again(
    sample, two_stage, tmp_path
):
    """The oracle's coordinates and delta_time; an extract kept without them is not reused."""
    url, store, requests, extracts, _ = two_stage
    plain = plan_extracts(requests)[0]
    kept = plan_extracts(requests, height_change=True)[0]
    assert kept.height_change and kept.granule_url == plain.granule_url
    result = extract_granule(kept)
    assert not result.reused and result.points == extracts[plain.granule_url].points
    bound = (BYTES_A_POINT + HEIGHT_CHANGE_BYTES) * result.points + 2048 * result.parents
    assert BYTES_A_POINT * result.points < result.bytes_written <= bound
    record = read_extract_record(store, CONFIG, kept.granule_url)
    assert list(record.columns) == ["h_li", "h_li_sigma", "latitude", "longitude", "time"]

    parent = max(record.points, key=lambda p: record.points[p])
    arrays = _fragment_arrays(store, kept.granule_url, int(parent))
    points = oracle.points_in_parent(oracle.good_points([Path(kept.granule_url)]), int(parent))
    assert arrays["child"].size == len(points) > 0
    for name, column in [
        ("latitude", "latitude"),
        ("longitude", "longitude"),
        ("time", "delta_time"),
    ]:
        assert arrays[name].dtype == np.float64
        np.testing.assert_array_equal(np.sort(arrays[name]), np.sort(points[column]))
    # A cell decodes the variables only, whichever kind of fragment it finds.
    data = store_bytes(store, fragment_key(CONFIG, kept.granule_url, int(parent)))
    assert sorted(decode(data, kept.granule_url, CONFIG).columns) == ["h_li", "h_li_sigma"]
    # Back to a plain run: the fragments are the variables' again (the kind is in the fingerprint).
    assert not extract_granule(plain).reused
    assert sorted(_fragment_arrays(store, plain.granule_url, int(parent))) == [
        "child",
        "dropped.fill",
        "dropped.quality",
        "h_li",
        "h_li_sigma",
    ]


def two_parents() -> np.ndarray:
    """Two order-6 morton words (valid cells, as an event's parents must be)."""
    lat, lon = np.array([-80.0, -75.0]), np.array([0.0, 90.0])
    return np.unique(parent_of(point_morton(lat, lon, 12), 6))


def test_an_extract_event_carries_the_height_change_choice():
    parents = tuple(int(p) for p in two_parents())
    request = ExtractRequest(
        "s3://magg-in/k.h5", parents, "s3://magg-out/s.zarr", 6, 12, height_change=True
    )
    assert ExtractRequest.from_event(request.to_event(), OPERATOR) == request
    plain = replace(request, height_change=False)
    assert "height_change" not in plain.to_event()
    assert ExtractRequest.from_event(plain.to_event(), OPERATOR) == plain
    assert request.pipeline_config().point_columns[-3:] == ("latitude", "longitude", "time")
    assert plain.pipeline_config().point_columns == ("h_li", "h_li_sigma")
