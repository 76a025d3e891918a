"""The height-change product on real parts: three cycles of the multi-cycle sample in moto S3,
each gridded by ``process-cycle`` keeping its fragments, then the ``height-change`` flow
on a real Prefect server.

The dh/dt store is compared with an independent fit (:func:`reference_fit`): h5py
reads the granules, healpy assigns points to cells and gives the cells' centres,
pyproj projects, and numpy's ``lstsq`` fits each child with the rejection rule
docs/height-change.md states.
"""

from __future__ import annotations

from datetime import datetime

import healpy
import mortie
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import xdggs
import zarr
from pyproj import Transformer

from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import load_config
from magg_core.cycles import ATLAS_EPOCH
from magg_core.errors import CellsFailedError
from magg_core.granules.sample import planted_dhdt, write_cycles
from magg_core.height_change.plan import (
    HeightChangePlanError,
    cycle_store_urls,
    plan_height_change,
    reference_epoch,
)
from magg_core.schema import FitOptions
from magg_core.store.arrays import create_template, open_store
from magg_core.store.fragments import fragment_key
from magg_core.store.records import read_records
from tests import oracle
from tests.flow_support import ambient_s3, cell_task_runs
from tests.height_change.test_dhdt_fit import oracle_fit

CYCLES = (20, 21, 22)
SAMPLE = {"n_granules": 3, "extent_km": 150.0}
"""Three passes flown in each of three cycles: 10 parents, ~0.4 M points a cycle."""
IN, OUT = "magg-dhdt-in", "magg-dhdt-out"
PATTERN = f"s3://{OUT}/atl06-cycle{{cycle}}.zarr"
EPOCH = datetime.fromisoformat("2023-11-06T12:00:00+00:00")
"""t0 of cycles 20-22: midway between 2023-06-23 (cycle 20 starts) and 2024-03-22 (22 ends)."""
JULIAN_YEAR_S = 365.25 * 86_400
ORDER = 12
N_CHILDREN = 4096


@pytest.fixture(scope="module")
def env(moto_server):
    with pytest.MonkeyPatch.context() as patch:
        ambient_s3(patch, moto_server)
        yield moto_server


@pytest.fixture(scope="module")
def cycles(env, prefect_server, tmp_path_factory):
    """The sample's granules by cycle, each cycle gridded into its store with fragments kept."""
    from magg.flows.process_cycle import process_cycle

    directory = tmp_path_factory.mktemp("cycles")
    granules = write_cycles(directory / "granules", CYCLES, **SAMPLE)
    env.create_bucket(IN)
    env.create_bucket(OUT)
    env.upload_dir(directory / "granules", IN, "ATL06")
    for cycle, written in granules.items():
        catalog = catalog_from_records([g.umm for g in written], cycle=cycle)
        summary = process_cycle(
            catalog=str(catalog.write(directory / f"catalog-{cycle}.json")),
            store=PATTERN.format(cycle=cycle),
            credentials="environment",
            granule_mirror=f"s3://{IN}/ATL06",
            keep_fragments=True,
        )
        assert not summary["failed_cells"]
    return granules


@pytest.fixture(scope="module")
def run(cycles):
    """The height-change flow over the three cycle stores."""
    from magg.flows.height_change import height_change

    state = height_change(
        cycles=list(CYCLES), stores=PATTERN, output=f"s3://{OUT}/dhdt.zarr", return_state=True
    )
    assert state.is_completed(), state.message
    return state.result()


@pytest.fixture(scope="module")
def product(run):
    return xr.open_zarr(open_store(run["store"], read_only=True), group=str(ORDER))


@pytest.fixture(scope="module")
def reference(cycles):
    """The independent fit of every child with data, by HEALPix nested id."""
    return reference_fit(cycles)


def test_stores_are_a_pattern_or_one_per_cycle():
    assert cycle_store_urls([22, 20], "s3://b/c{cycle}.zarr") == {
        20: "s3://b/c20.zarr",
        22: "s3://b/c22.zarr",
    }
    assert cycle_store_urls([21, 20], ["b.zarr", "a.zarr"]) == {20: "a.zarr", 21: "b.zarr"}
    with pytest.raises(HeightChangePlanError, match="lacks '{cycle}'"):
        cycle_store_urls([20, 21], "s3://b/one.zarr")
    with pytest.raises(HeightChangePlanError, match="2 stores for 3 cycles"):
        cycle_store_urls([20, 21, 22], ["a.zarr", "b.zarr"])
    with pytest.raises(HeightChangePlanError, match="at least two distinct"):
        cycle_store_urls([20, 20], "c{cycle}.zarr")


def test_the_reference_epoch_is_the_middle_of_the_cycles_nominal_span():
    assert reference_epoch([22, 20, 21]) == EPOCH
    assert reference_epoch([1, 2]).isoformat() == "2018-12-28T00:00:00+00:00"  # cycle 2 begins


def test_the_dhdt_store_decodes_with_xdggs(product):
    decoded = product.pipe(xdggs.decode)
    assert decoded.dggs.grid_info.level == ORDER
    for name in ("dhdt", "dhdt_se", "h0", "slope_x", "slope_y", "rms", "n_points", "n_cycles"):
        assert name in decoded and decoded[name].dims == ("cells",)
    assert decoded["dhdt"].attrs["units"] == "m/yr"
    assert decoded["h0"].attrs["reference_epoch"] == EPOCH.isoformat()


def test_every_child_equals_the_independent_fit(product, reference):
    ids = product["cell_ids"].values.astype(np.int64)
    fitted = product["n_points"].values > 0
    assert set(ids[fitted]) == set(reference), "the same children are fitted"
    rows = {cell: i for i, cell in enumerate(ids)}
    order = [rows[cell] for cell in reference]
    for name in ("n_points", "n_cycles"):
        np.testing.assert_array_equal(
            product[name].values[order], [r[name] for r in reference.values()], err_msg=name
        )
    for name in ("dhdt", "dhdt_se", "h0", "slope_x", "slope_y", "rms", "t_span"):
        want = np.array([r[name] for r in reference.values()])
        np.testing.assert_allclose(
            product[name].values[order], want, rtol=1e-6, atol=1e-6, err_msg=name
        )


def test_the_planted_rate_is_recovered_within_two_standard_errors(product):
    fitted = (product["n_cycles"].values >= 3) & (product["n_points"].values >= 10)
    lat, lon = mortie.mort2geo(product["morton"].values[fitted])
    planted = planted_dhdt(lat, lon)
    # A child whose 1.6 km straddles the glacier's sharp edge has no single rate.
    around = [
        planted_dhdt(lat + dlat, lon + dlon) for dlat in (-0.02, 0.02) for dlon in (-0.06, 0.06)
    ]
    uniform = np.all([a == planted for a in around], axis=0)
    error = np.abs(product["dhdt"].values[fitted] - planted)[uniform]
    within = error <= 2 * product["dhdt_se"].values[fitted][uniform]
    assert uniform.sum() > 500
    # 95 % of a finite set of cells, less 3 binomial standard errors (~2 % for ~800 cells),
    # as tests/height_change/test_dhdt_fit.py allows; an SE far too large would hold nearly
    # every cell.
    allowance = 3 * np.sqrt(0.95 * 0.05 / uniform.sum())
    assert 0.95 - allowance <= within.mean() <= 0.975, f"{within.mean():.1%} within 2 SE"


def test_provenance_lists_the_cycle_stores_and_their_fragments(run, cycles):
    group = zarr.open_group(open_store(run["store"], read_only=True), path=str(ORDER), mode="r")
    provenance = group.attrs["magg"]["provenance"]
    assert provenance["reference_epoch"] == EPOCH.isoformat() == run["reference_epoch"]
    assert provenance["fit_options"]["min_cycles"] == 3
    listed = {c["cycle"]: c for c in provenance["cycles"]}
    assert set(listed) == set(CYCLES)
    for cycle, granules in cycles.items():
        assert listed[cycle]["store"] == PATTERN.format(cycle=cycle)
        assert listed[cycle]["granules_with_fragments"] == len(granules)
        assert set(listed[cycle]["granules"]) == {g.name for g in granules}


def test_magg_plot_draws_dhdt_on_a_scale_centred_on_zero(run, product, tmp_path):
    from magg.flows.cli import main
    from magg_core.report.quicklook import colour_scale

    png = tmp_path / "dhdt.png"
    assert main(["plot", run["store"], "--variable", "dhdt", "-o", str(png)]) == 0
    assert png.stat().st_size > 10_000
    values = product["dhdt"].values[np.isfinite(product["dhdt"].values)]
    cmap, lo, hi = colour_scale("dhdt", values)
    assert cmap == "RdBu" and lo == -hi > -np.abs(values).max()
    assert colour_scale("h_mean", values)[0] == "viridis"


def test_a_cycle_store_without_fragments_is_a_clear_error(cycles):
    config = load_config()
    bare = f"s3://{OUT}/bare-cycle21.zarr"
    parents = sorted(read_records(open_store(PATTERN.format(cycle=21)), config))
    create_template(open_store(bare), config, parents, {})
    with pytest.raises(HeightChangePlanError, match=r"bare-cycle21.*--keep-fragments"):
        plan_height_change(
            [20, 21, 22], [PATTERN.format(cycle=20), bare, PATTERN.format(cycle=22)], config
        )


def test_a_missing_fragment_fails_its_parent_alone_and_a_rerun_fits_only_it(run, product):
    from magg.flows.height_change import height_change

    config = load_config()
    plan = plan_height_change(list(CYCLES), PATTERN, config)
    parent = int(plan.parents[len(plan.parents) // 2])
    granule = plan.cycles[1].granules[parent][0]
    store = open_store(PATTERN.format(cycle=21))
    key = fragment_key(config, granule, parent)
    kept = zarr.core.sync.sync(store.get(key, zarr.core.buffer.default_buffer_prototype()))
    zarr.core.sync.sync(store.delete(key))
    output = f"s3://{OUT}/dhdt-retry.zarr"
    parameters = {"cycles": list(CYCLES), "stores": PATTERN, "output": output}

    state = height_change(**parameters, return_state=True)
    assert state.is_failed()
    with pytest.raises(CellsFailedError) as failed:
        state.result()
    assert failed.value.summary["failed_cells"] == [str(parent)]
    records = read_records(open_store(output, read_only=True), config)
    assert records[parent].result.status == "failed"
    assert records[parent].result.files_failed[0].url == f"cycle 21: {granule}"
    assert {p for p, r in records.items() if r.result.status != "failed"} == set(
        int(p) for p in plan.parents
    ) - {parent}

    zarr.core.sync.sync(store.set(key, kept))
    state = height_change(**parameters, return_state=True)
    assert state.is_completed(), state.message
    runs = cell_task_runs(state.state_details.flow_run_id)
    ran = {int(r.name.removeprefix("cell-")) for r in runs if r.state.name != "Cached"}
    assert ran == {parent}, "only the failed parent is fitted again"
    again = xr.open_zarr(open_store(output, read_only=True), group=str(ORDER))
    for name in ("dhdt", "h0", "n_points"):
        np.testing.assert_array_equal(again[name].values, product[name].values, err_msg=name)


def test_a_lost_dhdt_chunk_is_fitted_again_and_nothing_else(run, product):
    """The parent's cache entry and record stand for its chunks only while the chunks are
    there: one deleted after a complete run is fitted again by the next, alone."""
    from magg.flows.height_change import height_change

    config = load_config()
    output = f"s3://{OUT}/dhdt-heal.zarr"
    parameters = {"cycles": list(CYCLES), "stores": PATTERN, "output": output}
    assert height_change(**parameters, return_state=True).is_completed()
    plan = plan_height_change(list(CYCLES), PATTERN, config)
    with_data = np.flatnonzero(product["n_points"].values.reshape(-1, N_CHILDREN).sum(axis=1) > 0)
    index = int(with_data[0])
    parent = int(plan.parents[index])
    store = open_store(output)
    zarr.core.sync.sync(store.delete(f"{ORDER}/dhdt/c/{index}"))

    state = height_change(**parameters, return_state=True)

    assert state.is_completed(), state.message
    runs = cell_task_runs(state.state_details.flow_run_id)
    assert {int(r.name.removeprefix("cell-")): r.state.name for r in runs} == {
        int(p): "Completed" if int(p) == parent else "Cached" for p in plan.parents
    }
    again = xr.open_zarr(open_store(output, read_only=True), group=str(ORDER))
    for name in ("dhdt", "h0", "n_points"):
        np.testing.assert_array_equal(again[name].values, product[name].values, err_msg=name)


# -- the independent fit -------------------------------------------------------------------


def reference_fit(granules: dict[int, list]) -> dict[int, dict[str, float]]:
    """Each child's fit, the slow obvious way, by HEALPix nested id.

    Points: h5py reads of the granules (:func:`tests.oracle.good_points`), cells by
    healpy, cell centres by healpy's ``pix2ang`` (authalic latitude made geodetic),
    x and y by pyproj in EPSG:3031, t in Julian years since :data:`EPOCH`. The fit:
    the weighted per-child ``lstsq`` with the rejection rule of docs/height-change.md,
    as tests/height_change/test_dhdt_fit.py writes it out (``oracle_fit``).
    """
    frames = []
    for cycle, written in granules.items():
        points = oracle.good_points([g.path for g in written], child_order=ORDER)
        points["cycle"] = cycle
        frames.append(points)
    points = pd.concat(frames, ignore_index=True)
    cells = points["cell"].to_numpy()
    lon_c, lat_c_authalic = healpy.pix2ang(2**ORDER, cells, nest=True, lonlat=True)
    lat_c = mortie.authalic_to_geodetic(lat_c_authalic)
    project = Transformer.from_crs("EPSG:4326", "EPSG:3031", always_xy=True)
    px, py = project.transform(points["longitude"].to_numpy(), points["latitude"].to_numpy())
    cx, cy = project.transform(lon_c, lat_c)
    since = (EPOCH - ATLAS_EPOCH).total_seconds()
    columns = {
        "x": np.asarray(px) - np.asarray(cx),
        "y": np.asarray(py) - np.asarray(cy),
        "t": (points["delta_time"].to_numpy() - since) / JULIAN_YEAR_S,
        "h": points["h_li"].to_numpy().astype(np.float64),
        "sigma": points["h_li_sigma"].to_numpy().astype(np.float64),
        "cycle": points["cycle"].to_numpy(),
    }
    order = np.argsort(cells, kind="stable")
    bounds = np.flatnonzero(np.diff(cells[order])) + 1
    fits = {}
    for rows in np.split(order, bounds):
        fit = _fit_child({k: v[rows] for k, v in columns.items()})
        if fit is not None:
            fits[int(cells[rows[0]])] = fit
    return dict(sorted(fits.items()))


def _fit_child(p: dict[str, np.ndarray]) -> dict[str, float] | None:
    """One child's fit by the per-child ``lstsq`` oracle of tests/height_change/test_dhdt_fit.py."""
    fit = oracle_fit(
        np.zeros(p["h"].size, dtype=np.int64),
        p["x"],
        p["y"],
        p["t"],
        p["h"],
        p["cycle"],
        1,
        FitOptions(),
        h_sigma=p["sigma"],
    )
    if np.isnan(fit["dhdt"][0]):
        return None
    return {name: value[0] for name, value in fit.items()}


def test_on_a_dask_cluster_the_product_equals_the_local_backend(run, product, env):
    """The ``dask`` backend fits on a real cluster's worker processes, as process-cycle does."""
    from distributed import LocalCluster

    from magg.flows.height_change import height_change

    output = f"s3://{OUT}/dhdt-dask.zarr"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        summary = height_change(
            cycles=list(CYCLES),
            stores=PATTERN,
            output=output,
            backend="dask",
            dask_address=cluster.scheduler_address,
        )
        seen = {n: p.state_counts["memory"] for n, p in cluster.scheduler.task_prefixes.items()}
    assert not summary["failed_cells"]
    assert seen.get("process_height_change_within", 0) >= run["cells"], seen
    remote = xr.open_zarr(open_store(output, read_only=True), group=str(ORDER))
    for name in product.data_vars:
        np.testing.assert_array_equal(remote[name].values, product[name].values, err_msg=name)
