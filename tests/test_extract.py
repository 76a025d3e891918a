"""Two stages, extract per granule then grid per cell, against the one-stage path and the oracle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from magg_core.catalog import catalog_from_records
from magg_core.cell import process_cell
from magg_core.config import load_config
from magg_core.extract import extract_granule
from magg_core.fragments import fragment_key, read_extract_record
from magg_core.plan import plan_cells, plan_extracts
from magg_core.sample import BEAMS, write_sample
from magg_core.store import create_template, open_store, read_records
from tests import oracle

CONFIG = load_config()
STATS = [s.name for s in CONFIG.aggregation.statistics]
USED = ("latitude", "longitude", "h_li", "h_li_sigma", "atl06_quality_summary", "delta_time")
BYTES_A_POINT = 2 + 4 + 4 + 3 * 8
"""child (uint16), h_li and h_li_sigma (float32), latitude, longitude and time (float64)."""


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
