"""process_cell end to end on the built-in sample, checked against the independent oracle."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
import xdggs
import zarr

from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import ConfigError, load_config
from magg_core.errors import CellDataError
from magg_core.granules.sample import write_sample
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import plan_cells
from magg_core.store.arrays import TemplateMismatchError, consolidate, create_template, open_store
from magg_core.store.records import read_records
from tests import oracle

CONFIG = load_config()
STATS = [s.name for s in CONFIG.aggregation.statistics]
EXACT = {"count", "h_min", "h_max", "h_q25", "h_q50", "h_q75"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sample")
    granules = write_sample(directory / "granules")
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    return directory, granules, catalog


def make_store(url, catalog):
    store = open_store(url)
    create_template(store, CONFIG, catalog.parents, {"test": True})
    return store


def local_requests(sample, store_path):
    directory, _, catalog = sample
    return plan_cells(catalog, CONFIG, store_path, granule_mirror=str(directory / "granules"))


def read_group(store) -> zarr.Group:
    return zarr.open_group(store, path="12", mode="r")


@pytest.fixture(scope="module")
def local_run(sample, tmp_path_factory):
    """Every cell of the sample processed into a local store."""
    _, _, catalog = sample
    url = str(tmp_path_factory.mktemp("out") / "atl06.zarr")
    store = make_store(url, catalog)
    results = {r.parent_morton: process_cell(r) for r in local_requests(sample, url)}
    consolidate(store)
    return url, store, results


def test_every_statistic_of_every_child_matches_the_oracle(sample, local_run):
    _, granules, catalog = sample
    _, store, results = local_run
    expected = oracle.reference_statistics([g.path for g in granules])
    group = read_group(store)
    parents = [int(p) for p in catalog.parents]
    n = CONFIG.output.children_per_parent

    assert set(expected) <= set(parents), "catalog missed a parent that has data"
    for i, parent in enumerate(parents):
        chunk = slice(i * n, (i + 1) * n)
        reference = expected.get(parent)
        for stat in CONFIG.aggregation.statistics:
            got = group[stat.name][chunk]
            if reference is None:  # a parent the footprints touch but no good point hits
                assert np.all(got == stat.fill_value) or np.all(np.isnan(got)), stat.name
                continue
            want = reference[stat.name].astype(stat.dtype)
            if stat.name == "count":
                np.testing.assert_array_equal(got, want)
            elif stat.name in EXACT:
                np.testing.assert_array_equal(got, want, err_msg=f"{parent} {stat.name}")
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{parent} {stat.name}")
        if reference is not None:
            empty = reference["count"] == 0
            assert np.all(np.isnan(group["h_mean"][chunk][empty]))
            assert results[parent].status == "ok"
            assert results[parent].cells_with_data == int(np.count_nonzero(~empty))


def test_total_count_is_every_good_point_inside_the_parents(sample, local_run):
    _, granules, catalog = sample
    _, store, results = local_run
    points = oracle.good_points([g.path for g in granules])
    inside = sum(len(oracle.points_in_parent(points, int(p))) for p in catalog.parents)
    assert inside == len(points) > 100_000  # every good point lies in some catalog cell
    assert sum(r.total_obs for r in results.values()) == inside
    assert int(read_group(store)["count"][:].sum()) == inside


def test_records_describe_every_cell(local_run):
    _, store, results = local_run
    records = read_records(store, CONFIG)
    assert set(records) == set(results)
    for parent, record in records.items():
        assert record.result.status == results[parent].status
        assert record.result.total_obs == results[parent].total_obs


def test_every_point_in_a_cell_is_in_its_statistics_or_counted_by_the_filter_that_dropped_it(
    sample, local_run
):
    _, granules, catalog = sample
    _, store, results = local_run
    paths = [g.path for g in granules]
    records = read_records(store, CONFIG)
    totals = dict.fromkeys(oracle.FILTERS, 0)
    for parent in (int(p) for p in catalog.parents):
        expected = oracle.filter_counts(paths, parent)
        assert results[parent].dropped == expected, parent
        assert records[parent].result.dropped == expected, parent
        for name, n in expected.items():
            totals[name] += n
    # the sample has bad-quality runs and fill runs in every granule; σ is never ≤ 0 there
    assert totals["quality"] > 1000 and totals["fill"] > 100 and totals["sigma"] == 0


def test_output_decodes_with_xdggs_both_ways(local_run):
    url, _, _ = local_run
    ds = xr.open_zarr(open_store(url, read_only=True), group="12")
    decoded = ds.pipe(xdggs.decode)
    assert decoded.dggs.grid_info.level == 12
    by_convention = ds.dggs.decode(convention="zarr")
    assert by_convention.dggs.grid_info.level == 12
    assert int(np.isfinite(ds["h_mean"]).sum()) > 1000


def test_s3_run_is_byte_identical_to_the_local_run(sample, local_run, s3_env, tmp_path):
    """Granules read over HTTP from moto with request credentials; store written to moto."""
    directory, _, catalog = sample
    moto = s3_env
    bucket = moto.create_bucket("magg-cell-inputs")
    moto.upload_dir(directory / "granules", bucket, "ATL06")
    moto.create_bucket("magg-cell-output")
    url = "s3://magg-cell-output/run.zarr"
    store = make_store(url, catalog)
    requests = plan_cells(catalog, CONFIG, url, granule_mirror=f"s3://{bucket}/ATL06")[:3]
    local_url, local_store, local_results = local_run
    for request in requests:
        request = replace(request, s3_credentials=moto.credentials)
        result = process_cell(request)
        assert result.status == local_results[request.parent_morton].status
        assert result.total_obs == local_results[request.parent_morton].total_obs
        assert moto.credentials.secret_access_key not in repr(result)
    remote, local = read_group(store), read_group(local_store)
    n = CONFIG.output.children_per_parent
    for request in requests:
        for name in STATS:
            chunk = slice(request.chunk_idx * n, (request.chunk_idx + 1) * n)
            assert remote[name][chunk].tobytes() == local[name][chunk].tobytes(), name


def corrupt_copies(granules, target: Path) -> list[str]:
    """Truncated and garbage copies of real granules."""
    target.mkdir()
    urls = []
    for i, granule in enumerate(granules):
        data = granule.path.read_bytes()
        broken = data[: len(data) // 2] if i % 2 else b"not an HDF5 file" * 1000
        path = target / granule.name
        path.write_bytes(broken)
        urls.append(str(path))
    return urls


def _chunk(store, request) -> dict[str, bytes]:
    n = CONFIG.output.children_per_parent
    chunk = slice(request.chunk_idx * n, (request.chunk_idx + 1) * n)
    return {name: read_group(store)[name][chunk].tobytes() for name in STATS}


def _assert_chunk_equals_oracle(store, request, paths) -> None:
    expected = oracle.reference_statistics(paths)[request.parent_morton]
    n = CONFIG.output.children_per_parent
    chunk = slice(request.chunk_idx * n, (request.chunk_idx + 1) * n)
    for stat in CONFIG.aggregation.statistics:
        got = read_group(store)[stat.name][chunk]
        want = expected[stat.name].astype(stat.dtype)
        if stat.name in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=stat.name)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=stat.name)


def _mixed_request(sample, tmp_path, url):
    """The sample's busiest cell with its first granule replaced by a broken copy."""
    _, granules, _ = sample
    request = max(local_requests(sample, url), key=lambda r: len(r.granule_urls))
    bad = corrupt_copies(
        [g for g in granules if g.name in {Path(u).name for u in request.granule_urls[:1]}],
        tmp_path / "bad",
    )
    return request, replace(request, granule_urls=(*bad, *request.granule_urls[1:])), bad


def test_a_cell_that_lost_a_granule_is_partial_and_keeps_earlier_output(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    store = make_store(url, catalog)
    request, mixed, bad = _mixed_request(sample, tmp_path, url)
    assert process_cell(request).status == "ok"
    before = _chunk(store, request)

    result = process_cell(mixed)

    assert result.status == "partial" and not result.is_complete
    assert [f.url for f in result.files_failed] == bad
    assert all(f.reason for f in result.files_failed)
    assert result.files_processed == len(request.granule_urls) - 1
    assert "not written" in result.error
    assert _chunk(store, request) == before  # nothing partial reaches the arrays
    record = read_records(store, CONFIG)[request.parent_morton].result
    assert record.status == "partial" and [f.url for f in record.files_failed] == bad


def test_an_accepted_partial_cell_equals_the_oracle_of_the_granules_read(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    store = make_store(url, catalog)
    _, mixed, bad = _mixed_request(sample, tmp_path, url)

    result = process_cell(replace(mixed, accept_partial=True))

    assert result.status == "partial" and "accepted" in result.error
    _assert_chunk_equals_oracle(store, mixed, mixed.granule_urls[len(bad) :])


@pytest.mark.parametrize("bad_sigma", [0.0, -0.25, np.inf, np.nan])
def test_points_with_an_invalid_sigma_are_dropped(sample, tmp_path, bad_sigma):
    """One σ = 0 point made its child's h_mean NaN and h_sigma 0; now it is not a point."""
    _, granules, catalog = sample
    url = str(tmp_path / "out.zarr")
    store = make_store(url, catalog)
    request = max(local_requests(sample, url), key=lambda r: len(r.granule_urls))
    copies = tmp_path / "copies"
    copies.mkdir()
    paths = []
    for source in request.granule_urls:
        path = copies / Path(source).name
        path.write_bytes(Path(source).read_bytes())
        paths.append(str(path))
    with h5py.File(paths[0], "r+") as f:  # every 50th row of every beam present
        for beam in [b for b in f if b.startswith("gt")]:
            sigma = f[f"{beam}/land_ice_segments/h_li_sigma"]
            values = sigma[:]
            values[::50] = bad_sigma
            sigma[:] = values

    result = process_cell(replace(request, granule_urls=tuple(paths)))

    assert result.status == "ok"
    assert result.total_obs == len(
        oracle.points_in_parent(oracle.good_points(paths), request.parent_morton)
    )
    _assert_chunk_equals_oracle(store, request, paths)
    counted = oracle.filter_counts(paths, request.parent_morton)
    assert result.dropped == counted
    # a σ of 0 or below is an invalid σ; a non-finite one is a value that is not there
    assert (counted["sigma"] > 0) == (np.isfinite(bad_sigma) and bad_sigma <= 0)


@pytest.mark.parametrize(
    ("column", "expression", "value"),
    [
        ("weight", "0", "0"),  # every weight zero: every point was dropped, run Completed
        ("weight", "1 / h_li_sigma**200", "inf"),  # overflows for every σ < ~0.03 m
        ("weight", "-1 / h_li_sigma**2", "-"),  # negative weights
        ("h_cm", "sqrt(h_li - 3300)", "nan"),  # a statistic's column, not a weight
    ],
)
def test_a_derived_value_invalid_where_the_data_passed_fails_the_cell_naming_the_expression(
    sample, tmp_path, column, expression, value
):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    raw = CONFIG.to_dict()
    raw["aggregation"]["columns"][column] = expression
    if column == "h_cm":
        raw["aggregation"]["statistics"]["h_cm_mean"] = {
            "function": "mean",
            "column": "h_cm",
            "dtype": "float32",
            "fill_value": "nan",
        }
    config = load_config(raw)
    store = open_store(url)
    create_template(store, config, catalog.parents, {"test": True})
    request = max(local_requests(sample, url), key=lambda r: len(r.granule_urls))
    pattern = (
        rf"cell {request.parent_morton}: config error: aggregation\.columns\.{column} = "
        rf"'{re.escape(expression)}' must be finite.* but is {value}.* for [\d,]+ of [\d,]+ "
        "points that passed every filter"
    )
    with pytest.raises(CellDataError, match=pattern):
        process_cell(replace(request, config=raw))
    assert int(read_group(store)["count"][:].sum()) == 0
    assert read_records(store, config) == {}


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("count", {"dtype": "int8", "fill_value": 0}, "int8 cannot hold"),
        ("count", {"dtype": "uint8", "fill_value": 0}, "uint8 cannot hold"),
        ("h_sigma", {"dtype": "int32", "fill_value": 0, "transform": "1 / sqrt(x - x)"}, "inf"),
        ("h_mean", {"dtype": "float32", "transform": "x * 1e36"}, "float32 cannot hold"),
    ],
)
def test_a_statistic_its_dtype_cannot_hold_fails_the_cell(sample, tmp_path, name, change, message):
    """NaN cast to int32 was written as -2147483648; 300 points counted in int8 as 44."""
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    raw = CONFIG.to_dict()
    raw["aggregation"]["statistics"][name].update(change)
    config = load_config(raw)
    store = open_store(url)
    create_template(store, config, catalog.parents, {"test": True})
    request = max(local_requests(sample, url), key=lambda r: len(r.granule_urls))
    with pytest.raises(CellDataError, match=rf"statistic '{name}' is .*{message}"):
        process_cell(replace(request, config=raw))
    assert read_records(store, config) == {}


def test_a_statistic_that_comes_out_non_finite_fails_the_cell_by_name(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    raw = CONFIG.to_dict()
    raw["aggregation"]["statistics"]["h_sigma"]["transform"] = "1 / sqrt(x - x)"
    config = load_config(raw)
    store = open_store(url)
    create_template(store, config, catalog.parents, {"test": True})
    request = max(local_requests(sample, url), key=lambda r: len(r.granule_urls))
    with pytest.raises(CellDataError, match=rf"cell {request.parent_morton}: statistic 'h_sigma'"):
        process_cell(replace(request, config=raw))
    assert int(read_group(store)["count"][:].sum()) == 0
    assert read_records(store, config) == {}


def test_a_cell_whose_granules_all_fail_is_failed_and_keeps_earlier_output(sample, tmp_path):
    directory, granules, catalog = sample
    url = str(tmp_path / "out.zarr")
    store = make_store(url, catalog)
    request = max(local_requests(sample, url), key=lambda r: len(r.granule_urls))
    good = process_cell(request)
    n = CONFIG.output.children_per_parent
    chunk = slice(request.chunk_idx * n, (request.chunk_idx + 1) * n)
    before = {name: read_group(store)[name][chunk].tobytes() for name in STATS}

    names = {Path(u).name for u in request.granule_urls}
    bad = corrupt_copies([g for g in granules if g.name in names], tmp_path / "bad")
    result = process_cell(replace(request, granule_urls=tuple(bad)))

    assert good.status == "ok" and result.status == "failed"
    assert result.error and len(result.files_failed) == len(bad)
    after = {name: read_group(store)[name][chunk].tobytes() for name in STATS}
    assert after == before
    assert read_records(store, CONFIG)[request.parent_morton].result.status == "failed"


def test_missing_granules_are_reported_per_url(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    make_store(url, catalog)
    request = local_requests(sample, url)[0]
    missing = str(tmp_path / "nowhere" / "ATL06_20240101000000_00012201_007_01.h5")
    result = process_cell(replace(request, granule_urls=(*request.granule_urls, missing)))
    assert [f.url for f in result.files_failed] == [missing]


def test_a_cell_not_in_the_template_writes_nothing(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    store = make_store(url, catalog)
    requests = local_requests(sample, url)
    wrong = replace(requests[0], chunk_idx=requests[1].chunk_idx)
    with pytest.raises(TemplateMismatchError):
        process_cell(wrong)
    assert read_records(store, CONFIG) == {}
    assert int(read_group(store)["count"][:].sum()) == 0


def test_a_malformed_config_in_the_request_names_the_key(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    make_store(url, catalog)
    request = local_requests(sample, url)[0]
    config = CONFIG.to_dict()
    config["aggregation"]["columns"]["weight"] = "__import__('os').system('true')"
    with pytest.raises(ConfigError, match="aggregation.columns.weight"):
        process_cell(replace(request, config=config))


def test_no_granules_writes_fill_and_says_so(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "out.zarr")
    store = make_store(url, catalog)
    request = local_requests(sample, url)[0]
    result = process_cell(replace(request, granule_urls=()))
    assert result.status == "no_granules" and result.total_obs == 0
    assert int(read_group(store)["count"][:].sum()) == 0
