"""What a run does with a catalog: grid each granule once, refuse cells it cannot hold.

The revision case is checked on the gridded values (against the independent
oracle), and the bad-cell case through ``magg run``, where it must stop
before the store is created.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from magg.flows.cli import main
from magg_core.catalog.catalog import Catalog, build_catalog
from magg_core.catalog.cmr import RetryPolicy
from magg_core.config import load_config
from magg_core.granules.sample import write_sample
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import PlanError, plan_cells
from magg_core.morton import parent_of, point_morton
from magg_core.store.arrays import create_template, open_store
from tests import oracle
from tests.fakes.cmr import FakeCmr, revision_of

CYCLE = 22
CONFIG = load_config()
FAST = RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=5.0)


def word(order: int, lat: float = -75.0, lon: float = 123.0) -> int:
    """The morton word of the order-``order`` cell holding one point."""
    return int(parent_of(point_morton(np.array([lat]), np.array([lon]), 18), order)[0])


@pytest.fixture(scope="module")
def granules(tmp_path_factory):
    """Three sample granules, and a second revision of the first with the same bytes."""
    directory = tmp_path_factory.mktemp("granules")
    sample = write_sample(directory, n_granules=3, extent_km=150.0)
    newer = revision_of(sample[0].umm, "02")
    shutil.copy(sample[0].path, directory / newer["umm"]["GranuleUR"])
    return directory, sample, newer


def test_two_revisions_grid_like_one(granules, tmp_path):
    """Both revisions listed by CMR: the grid equals the oracle of the newest alone.

    The copy has the first revision's bytes, so gridding both would double
    every count of its cells and shrink h_sigma by √2.
    """
    directory, sample, newer = granules
    cmr = FakeCmr(items=[newer] + [g.umm for g in sample]).start()
    try:
        catalog = build_catalog(cycle=CYCLE, cmr_url=cmr.url, retry=FAST)
    finally:
        cmr.stop()
    newest = [directory / newer["umm"]["GranuleUR"]] + [g.path for g in sample[1:]]
    assert {g.name for gs in catalog.cells.values() for g in gs} == {p.name for p in newest}

    store_path = str(tmp_path / "out.zarr")
    store = open_store(store_path)
    create_template(store, CONFIG, catalog.parents, {"test": True})
    requests = plan_cells(catalog, CONFIG, store_path, granule_mirror=str(directory))
    for request in requests:
        assert process_cell(request).status in ("ok", "empty")

    expected = oracle.reference_statistics(newest)
    revised = {c for c, gs in catalog.cells.items() if newest[0].name in {g.name for g in gs}}
    assert revised & expected.keys()  # cells where the old revision would have doubled counts
    n = CONFIG.output.children_per_parent
    group = zarr.open_group(store, path="12", mode="r")
    for i, parent in enumerate(int(p) for p in catalog.parents):
        chunk = slice(i * n, (i + 1) * n)
        if parent not in expected:
            assert not group["count"][chunk].any()
            continue
        np.testing.assert_array_equal(group["count"][chunk], expected[parent]["count"])
        np.testing.assert_allclose(
            group["h_sigma"][chunk], expected[parent]["h_sigma"], rtol=1e-6, equal_nan=True
        )


def test_plan_refuses_cells_that_are_no_words_of_the_configs_order():
    for key, reason in [
        (word(7), "is a morton word of order 7, not of order 6"),
        (12345, "is not a morton word"),
    ]:
        catalog = Catalog(metadata={"cycle": CYCLE}, cells={word(6): (), key: ()})
        with pytest.raises(PlanError, match=f"catalog cell {key} {reason}"):
            plan_cells(catalog, CONFIG, "x.zarr")
    fine = Catalog(metadata={"cycle": CYCLE}, cells={word(6): ()})
    assert [r.parent_morton for r in plan_cells(fine, CONFIG, "x.zarr")] == [word(6)]


@pytest.mark.parametrize(
    ("cells", "parent_order", "message"),
    [
        ({word(6): (), word(7): ()}, 6, f"cell key {word(7)} is a morton word of order 7"),
        ({word(6): (), 12345: ()}, 6, "cell key 12345 is not a morton word"),
        ({word(7): ()}, 7, "catalog cells are order 7 but the config's output.parent_order is 6"),
    ],
)
def test_magg_run_on_a_catalog_with_a_bad_cell_writes_nothing(
    cells, parent_order, message, prefect_server, tmp_path, capsys
):
    catalog = Catalog(metadata={"parent_order": parent_order, "cycle": CYCLE}, cells=cells)
    path = catalog.write(tmp_path / "bad.json")
    store = tmp_path / "out.zarr"
    args = ["run", "--catalog", str(path), "--store", str(store), "--credentials", "none"]
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("magg run: error: ") and message in last
    assert not store.exists()
