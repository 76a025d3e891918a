"""Pyramid levels (``output.levels``): config, per-level statistics, staging, assembly, flow.

Every level of a store is compared with the independent oracle at that order
(h5py + healpy at the order itself + pandas), never with magg's own coarsening.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import xdggs
import zarr

from magg.flows.cli import main
from magg.flows.process_cycle import process_cycle
from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import ConfigError, load_config
from magg_core.granules.sample import write_sample
from magg_core.grid import assembly
from magg_core.grid.assembly import assemble_levels
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import plan_cells
from magg_core.stats.levels import level_statistics
from magg_core.store.arrays import ArraySpec, create_template, open_store, store_levels
from magg_core.store.staging import (
    decode_staging,
    encode_staging,
    staged_orders,
    staging_key,
)
from tests import oracle
from tests.flow_support import (
    SAMPLE,
    cell_task_runs,
    local_run_fixture,  # noqa: F401 - the shared ``local_run``
    retry_like_the_ui,
)

CONFIG = load_config()
ORDERS = tuple(range(6, 13))
EXACT = {"count", "h_min", "h_max", "h_q25", "h_q50", "h_q75"}
"""Order statistics and counts: equal to the oracle's bit for bit once in float32."""


def raw_config(**output) -> dict:
    raw = CONFIG.to_dict()
    raw["output"] = {k: v for k, v in raw["output"].items() if k != "levels"} | output
    return raw


# -- config ---------------------------------------------------------------------------------


def test_the_builtin_config_has_every_level_from_parent_to_child_order():
    assert CONFIG.output.orders == ORDERS
    assert staged_orders(CONFIG) == ORDERS[:-1]


def test_without_levels_there_is_the_child_order_alone():
    config = load_config(raw_config())
    assert config.output.levels == () and config.output.orders == (12,)
    assert staged_orders(config) == ()
    assert load_config(raw_config(levels=[12, 6, 9])).output.orders == (6, 9, 12)
    assert CONFIG.with_orders(6, 8).output.orders == (8,)


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ("6..12", "expected list"),
        ([], "non-empty list of integer orders"),
        ([6, 7.0, 12], "non-empty list of integer orders"),
        ([True, 12], "non-empty list of integer orders"),
        ([6, 6, 12], "must be unique"),
        ([5, 6, 12], r"must lie in parent_order..child_order \(6..12\), got \[5\]"),
        ([6, 13, 12], r"got \[13\]"),
        ([6, 7, 8], "must include child_order 12"),
    ],
)
def test_bad_levels_name_the_key(levels, message):
    with pytest.raises(ConfigError, match=rf"^output\.levels: .*{message}"):
        load_config(raw_config(levels=levels))


# -- one parent's levels, against pandas ------------------------------------------------------


def _positive(rng, n):
    return rng.normal(2_000.0, 30.0, n).astype(np.float32)


def _signed_with_ties(rng, n):
    """Below and above the ellipsoid, ±0 and repeated values: the sort's sign-flip route."""
    values = np.array([-0.0, 0.0, -12.5, 3.25, -1e-3, 250.0], dtype=np.float32)
    h = rng.normal(0.0, 40.0, n).astype(np.float32)
    tie = rng.random(n) < 0.3
    h[tie] = rng.choice(values, np.count_nonzero(tie))
    return h


def _float64(rng, n):
    """Heights that float32 cannot hold: the general (argsort) route at every order."""
    return rng.normal(1_000.0, 5.0, n)


@pytest.mark.parametrize("heights", [_positive, _signed_with_ties, _float64])
@pytest.mark.parametrize("in_runs", [True, False], ids=["runs", "shuffled"])
def test_level_statistics_equal_a_pandas_groupby_at_every_order(heights, in_runs):
    """Every order from one sort (magg_core.stats.aggregate.aggregate_levels) against pandas."""
    rng = np.random.default_rng(7)
    n = 30_000
    occupied = rng.choice(4096, size=400, replace=False)  # most children empty
    child = np.sort(rng.choice(occupied, size=n))  # in runs, as a reader returns them
    if not in_runs:
        child = rng.permutation(child)
    h = heights(rng, n)
    sigma = rng.uniform(0.02, 0.5, n).astype(np.float32)

    levels = level_statistics(child, {"h_li": h, "h_li_sigma": sigma}, CONFIG)

    assert list(levels) == list(ORDERS)
    for order, stats in levels.items():
        n_cells = 4 ** (order - 6)
        w = 1.0 / sigma.astype(np.float64) ** 2
        frame = pd.DataFrame({"cell": child // 4 ** (12 - order), "h": h.astype(np.float64)})
        frame["w"], frame["wh"] = w, w * frame["h"]
        g = frame.groupby("cell")
        want = {
            "count": g["h"].size(),
            "h_min": g["h"].min(),
            "h_max": g["h"].max(),
            "h_mean": g["wh"].sum() / g["w"].sum(),
            "h_sigma": 1.0 / np.sqrt(g["w"].sum()),
            "h_variance": g["h"].var(ddof=0),
            "h_q25": g["h"].quantile(0.25),
            "h_q50": g["h"].quantile(0.5),
            "h_q75": g["h"].quantile(0.75),
        }
        for stat in CONFIG.aggregation.statistics:
            got = stats[stat.name]
            assert got.dtype == stat.dtype and got.shape == (n_cells,)
            expected = np.full(n_cells, stat.fill_value, dtype=np.float64)
            expected[want[stat.name].index.to_numpy()] = want[stat.name].to_numpy()
            if stat.name in EXACT:
                np.testing.assert_array_equal(got, expected.astype(stat.dtype), err_msg=stat.name)
            else:
                np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"{order} {stat.name}")


def test_a_staging_object_round_trips_and_refuses_another_config():
    levels = level_statistics(
        np.arange(10), {"h_li": np.ones(10), "h_li_sigma": np.ones(10)}, CONFIG
    )
    del levels[12]  # staged: the coarse orders
    data = encode_staging(levels)
    back = decode_staging(data, CONFIG, "k")
    assert {k: {n: v.tobytes() for n, v in s.items()} for k, s in back.items()} == {
        k: {n: v.tobytes() for n, v in s.items()} for k, s in levels.items()
    }
    other = raw_config(levels=[6, 12])
    other["aggregation"]["statistics"]["count"]["dtype"] = "int64"
    with pytest.raises(ValueError, match=r"staging object k: '6/count' is int32"):
        decode_staging(data, load_config(other), "k")


def test_a_staging_object_of_the_former_layout_still_reads():
    """Before: an array per order and statistic (``"{order}/{statistic}"``); a store's
    parents not in this run keep such objects, and the assembly reads every parent's."""
    levels = level_statistics(
        np.arange(0, 4096, 7), {"h_li": np.arange(586.0), "h_li_sigma": np.ones(586)}, CONFIG
    )
    del levels[12]
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{k}/{n}": v for k, s in levels.items() for n, v in s.items()})

    back = decode_staging(buffer.getvalue(), CONFIG, "k")

    assert {k: {n: v.tobytes() for n, v in s.items()} for k, s in back.items()} == {
        k: {n: v.tobytes() for n, v in s.items()} for k, s in levels.items()
    }
    assert len(buffer.getvalue()) > len(encode_staging(levels)) > 0
    with np.load(io.BytesIO(encode_staging(levels))) as npz:
        assert sorted(npz.files, key=int) == [str(k) for k in sorted(levels)]


# -- process_cell + assembly on local files -----------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    directory = tmp_path_factory.mktemp("levels-sample")
    granules = write_sample(directory / "granules", **SAMPLE)
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    paths = [g.path for g in granules]
    return directory, paths, catalog


@pytest.fixture(scope="module")
def reference(sample):
    """The oracle at every order, laid out like the store."""
    _, paths, catalog = sample
    return {k: oracle.reference_level(paths, catalog.parents, k) for k in ORDERS}


def requests_for(sample, url, config=CONFIG):
    directory, _, catalog = sample
    return plan_cells(catalog, config, url, granule_mirror=str(directory / "granules"))


@pytest.fixture(scope="module")
def built(sample, tmp_path_factory):
    """Every cell processed into a local store, then the levels assembled."""
    _, _, catalog = sample
    url = str(tmp_path_factory.mktemp("levels-out") / "atl06.zarr")
    store = open_store(url)
    create_template(store, CONFIG, catalog.parents, {"test": True})
    results = {r.parent_morton: process_cell(r) for r in requests_for(sample, url)}
    found = assemble_levels(store, CONFIG)
    return url, results, found


def level_arrays(url: str, order: int) -> dict[str, np.ndarray]:
    group = zarr.open_group(open_store(url, read_only=True), path=str(order), mode="r")
    return {name: array[:] for name, array in group.arrays()}


def assert_level_equals(arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray], order):
    for stat in CONFIG.aggregation.statistics:
        got, want = arrays[stat.name], expected[stat.name]
        message = f"order {order} {stat.name}"
        if stat.name in EXACT:
            np.testing.assert_array_equal(got, want.astype(stat.dtype), err_msg=message)
        else:
            np.testing.assert_allclose(got, want, rtol=2e-6, equal_nan=True, err_msg=message)


def assert_cell_ids(arrays: dict[str, np.ndarray], parents, order: int) -> None:
    """Each parent's cells are its nested children at ``order``, ascending (oracle's mortie map)."""
    per_parent = 4 ** (order - 6)
    ids = arrays["cell_ids"].astype(np.int64)
    for i, parent in enumerate(parents):
        mine = ids[i * per_parent : (i + 1) * per_parent]
        parent_id = int(mine[0]) >> (2 * (order - 6))
        assert oracle.parent_morton(parent_id, 6) == int(parent)
        np.testing.assert_array_equal(
            mine, (parent_id << (2 * (order - 6))) + np.arange(per_parent)
        )


def test_every_level_equals_the_oracle(sample, reference, built):
    _, _, catalog = sample
    url, results, found = built
    assert found == sum(r.total_obs > 0 for r in results.values()) > 1
    for order in ORDERS:
        arrays = level_arrays(url, order)
        assert_level_equals(arrays, reference[order], order)
        assert_cell_ids(arrays, catalog.parents, order)
    total = int(reference[12]["count"].sum())
    assert all(int(level_arrays(url, k)["count"].sum()) == total for k in ORDERS)


def test_every_level_is_chunked_by_4096_cells(sample, built):
    url, _, _ = built
    n_parents = len(sample[2].parents)
    levels = store_levels(open_store(url, read_only=True), CONFIG)
    assert [level.order for level in levels] == list(ORDERS)
    for level in levels:
        assert level.cells == n_parents * 4 ** (level.order - 6)
        assert level.chunk_cells == 4096
        group = zarr.open_group(open_store(url, read_only=True), path=str(level.order), mode="r")
        assert {array.chunks for _, array in group.arrays()} == {(4096,)}
        assert group.attrs["dggs"]["refinement_level"] == level.order
        assert group["cell_ids"].attrs["level"] == level.order


def test_assembled_chunks_are_the_bytes_zarr_writes(sample, built, tmp_path):
    """The assembly encodes the coarse chunks itself: each is the object zarr's own write
    of the same values makes (the edge chunk, padded, and all-fill chunks, absent, too)."""
    url, _, _ = built
    root, twin = Path(url), tmp_path / "twin.zarr"
    for document in root.rglob("zarr.json"):  # the same template, arrays empty
        (twin / document.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        (twin / document.relative_to(root)).write_bytes(document.read_bytes())
    edges = 0
    for order in ORDERS[:-1]:
        arrays = level_arrays(url, order)
        group = zarr.open_group(open_store(str(twin)), path=str(order), mode="r+")
        edges += arrays["count"].shape[0] % 4096 != 0
        for stat in CONFIG.aggregation.statistics:
            group[stat.name][:] = arrays[stat.name]
            ours = {
                p.relative_to(root): p.read_bytes()
                for p in (root / str(order) / stat.name / "c").rglob("*")
                if p.is_file()
            }
            zarrs = {
                p.relative_to(twin): p.read_bytes()
                for p in (twin / str(order) / stat.name / "c").rglob("*")
                if p.is_file()
            }
            assert ours == zarrs, (order, stat.name)
    assert edges > 0  # some level ends inside a chunk: the padding is checked


@pytest.mark.parametrize(
    ("first_chunk", "cells"), [(0, 4095), (0, 4097), (1, 4096 * 3)], ids=["short", "long", "beyond"]
)
def test_chunk_objects_refuse_values_that_are_not_whole_chunks(first_chunk, cells):
    from zarr.core.sync import sync

    from magg_core.store.arrays import chunk_objects

    store = zarr.storage.MemoryStore()
    array = zarr.create_array(store, shape=(4096 * 3 + 100,), chunks=(4096,), dtype="f4")
    with pytest.raises(ValueError, match="not whole chunks"):
        sync(chunk_objects(array.metadata, "a", first_chunk, np.zeros(cells, "f4")))


def test_assembly_is_idempotent_and_follows_every_rerun_of_a_cell(
    sample, reference, built, tmp_path
):
    """A cell cleared, left partial (keeps its levels), then recomputed: the levels follow."""
    _, _, catalog = sample
    parents = [int(p) for p in catalog.parents]
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(built[0], url)
    store = open_store(url)

    def level_files() -> dict[str, bytes]:
        root = Path(url)
        return {
            str(p.relative_to(root)): p.read_bytes()
            for k in ORDERS[:-1]
            for p in sorted((root / str(k)).rglob("*"))
            if p.is_file()
        }

    before = level_files()
    assemble_levels(store, CONFIG)
    assert level_files() == before
    for batch in (1, 4):  # chunks whose parents span batches are carried over whole
        shutil.rmtree(Path(url) / "6" / "count" / "c")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(assembly, "PARENTS_PER_BATCH", batch)
            assemble_levels(store, CONFIG)
        assert level_files() == before

    request = max(requests_for(sample, url), key=lambda r: len(r.granule_urls))
    index = parents.index(request.parent_morton)
    assert process_cell(replace(request, granule_urls=())).status == "no_granules"
    assert not (Path(url) / staging_key(CONFIG, request.parent_morton)).exists()
    assemble_levels(store, CONFIG)
    for order in ORDERS:
        per_parent = 4 ** (order - 6)
        cleared = {name: values.copy() for name, values in reference[order].items()}
        for name, values in cleared.items():
            values[index * per_parent : (index + 1) * per_parent] = 0 if name == "count" else np.nan
        assert_level_equals(level_arrays(url, order), cleared, order)

    staged = (Path(url) / staging_key(CONFIG, request.parent_morton)).parent
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an HDF5 file" * 100)
    process_cell(request)
    kept = (Path(url) / staging_key(CONFIG, request.parent_morton)).read_bytes()
    partial = process_cell(replace(request, granule_urls=(*request.granule_urls, str(broken))))
    assert partial.status == "partial"
    assert (staged / f"{request.parent_morton}.npz").read_bytes() == kept
    assemble_levels(store, CONFIG)
    for order in ORDERS:
        assert_level_equals(level_arrays(url, order), reference[order], order)


def test_a_config_without_levels_writes_the_child_group_alone(sample, built, tmp_path):
    _, _, catalog = sample
    config = load_config(raw_config())
    url = str(tmp_path / "plain.zarr")
    store = open_store(url)
    create_template(store, config, catalog.parents, {"test": True})
    for request in requests_for(sample, url, config)[:2]:
        process_cell(request)

    assert sorted(p.name for p in Path(url).iterdir()) == ["12", "records", "zarr.json"]
    assert assemble_levels(store, config) == 0
    assert [level.order for level in store_levels(store, config)] == [12]
    for name in ("cell_ids", "morton", "count", "h_q50"):  # the child group's layout is unchanged
        assert (Path(url) / "12" / name / "zarr.json").read_bytes() == (
            Path(built[0]) / "12" / name / "zarr.json"
        ).read_bytes()


def test_a_product_with_its_own_arrays_gets_the_child_group_alone(sample, tmp_path):
    _, _, catalog = sample
    url = str(tmp_path / "product.zarr")
    arrays = (ArraySpec("dhdt", np.dtype("float32"), np.float32("nan")),)
    create_template(open_store(url), CONFIG, catalog.parents, {}, arrays=arrays)
    assert sorted(p.name for p in Path(url).iterdir()) == ["12", "zarr.json"]


# -- the flow -------------------------------------------------------------------------------


def test_the_flow_writes_every_level_equal_to_the_oracle(local_run, s3_env, tmp_path, capsys):
    """The shared local-backend run (moto S3, real Prefect server): every level, decoded."""
    sample = local_run.sample
    paths = sorted((sample.catalog_path.parent / "granules").glob("*.h5"))
    store = open_store(local_run.store, read_only=True)
    for order in ORDERS:
        expected = oracle.reference_level(paths, sample.parents, order)
        dataset = xr.open_zarr(store, group=str(order))  # consolidated metadata
        decoded = dataset.pipe(xdggs.decode)
        assert decoded.dggs.grid_info.level == order
        arrays = {name: dataset[name].values for name in dataset.variables}
        assert_level_equals(arrays, expected, order)
        assert_cell_ids(arrays, sample.parents, order)

    assert main(["inspect", local_run.store]) == 0
    out = capsys.readouterr().out
    for order in ORDERS:
        cells = len(sample.parents) * 4 ** (order - 6)
        assert f"level {order}: group /{order}/, {cells:,} cells, chunks of 4,096 cells" in out
    png = tmp_path / "order6.png"
    assert main(["plot", local_run.store, "--order", "6", "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", local_run.store, "--order", "13", "--output", str(png)]) == 1
    assert "--order 13: " in capsys.readouterr().err


def test_a_ui_retry_updates_the_levels(local_run, tmp_path):
    """A run that lost a granule (partial cells accepted, one cell failed), then the UI's Retry
    once the granule is back: only the incomplete cells run again, and the levels are assembled
    from every parent's staging object, the cached cells' and the re-run cells' new ones.
    """
    sample = local_run.sample
    granules = sample.catalog_path.parent / "granules"
    mirror = tmp_path / "mirror"
    shutil.copytree(granules, mirror)
    lost = sample.catalog.cells[sample.parents[0]][0].name
    (mirror / lost).rename(tmp_path / lost)
    store = str(tmp_path / "flow.zarr")

    first = process_cycle(
        catalog=str(sample.catalog_path),
        store=store,
        credentials="none",
        granule_mirror=str(mirror),
        accept_partial=True,
        return_state=True,
    )
    assert first.is_failed()
    paths = sorted(granules.glob("*.h5"))
    full = {k: oracle.reference_level(paths, sample.parents, k) for k in ORDERS}
    without = oracle.reference_level(sorted(mirror.glob("*.h5")), sample.parents, 6)
    np.testing.assert_array_equal(level_arrays(store, 6)["count"], without["count"])
    assert not np.array_equal(without["count"], full[6]["count"])

    (tmp_path / lost).rename(mirror / lost)
    retried = retry_like_the_ui(process_cycle, first.state_details.flow_run_id)
    assert retried.is_completed(), retried.message
    rerun = cell_task_runs(first.state_details.flow_run_id, flow_run_count=2)
    touched = {p for p in sample.parents if lost in {g.name for g in sample.catalog.cells[p]}}
    ran = {int(r.name.removeprefix("cell-")) for r in rerun if r.state.name != "Cached"}
    assert (
        ran == touched
    )  # the others came from the cache: their staging objects are the first run's
    for order in ORDERS:
        assert_level_equals(level_arrays(store, order), full[order], order)
