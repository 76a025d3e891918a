"""From a catalog to the cell requests a run dispatches (pure: no I/O)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from magg_core.access.credentials import DEFAULT_MARGIN
from magg_core.catalog.catalog import Catalog, CatalogGranule
from magg_core.config import load_config
from magg_core.grid.plan import (
    MAX_CELL_TIMEOUT_S,
    PlanError,
    check_cell_timeout,
    check_mirror,
    cycle_store,
    plan_cells,
    store_url_for,
)

# Three order-6 parents (uint64 morton words, >= 2**63 as in Antarctica) and their granules.
A, B, C = 11573406617412042758, 11579880541876387846, 11592828390805078022
G1 = "ATL06_20240108161323_00412212_007_01.h5"
G2 = "ATL06_20240129160611_03612212_007_01.h5"
G3 = "ATL06_20240223031835_07342210_007_01.h5"


def granule(name: str) -> CatalogGranule:
    return CatalogGranule(
        name=name,
        s3=f"s3://nsidc-cumulus-prod-protected/ATLAS/ATL06/007/2024/01/08/{name}",
        https=f"https://data.nsidc.earthdatacloud.nasa.gov/nsidc-cumulus-prod-protected/{name}",
    )


@pytest.fixture
def catalog() -> Catalog:
    # Deliberately not in ascending order: the plan must follow morton order.
    cells = {C: (granule(G3),), A: (granule(G1), granule(G2)), B: ()}
    return Catalog(metadata={"parent_order": 6, "cycle": 7}, cells=cells)


def test_one_request_per_cell_in_chunk_order(catalog):
    config = load_config()
    requests = plan_cells(catalog, config, "s3://out/store.zarr")

    assert [r.parent_morton for r in requests] == [A, B, C]
    assert [r.chunk_idx for r in requests] == [0, 1, 2]
    assert requests[0].granule_urls == tuple(g.s3 for g in catalog.cells[A])
    assert requests[1].granule_urls == ()
    for r in requests:
        assert (r.parent_order, r.child_order) == (6, 12)
        assert r.store_path == "s3://out/store.zarr"
        assert r.s3_credentials is None
        assert load_config(r.config).hash == config.hash


def test_a_selection_keeps_each_cells_chunk_index(catalog):
    config = load_config()
    picked = plan_cells(catalog, config, "x.zarr", cells=[str(C), A])
    assert [(r.parent_morton, r.chunk_idx) for r in picked] == [(A, 0), (C, 2)]

    first = plan_cells(catalog, config, "x.zarr", cells=[C, B], max_cells=1)
    assert [(r.parent_morton, r.chunk_idx) for r in first] == [(B, 1)]
    assert len(plan_cells(catalog, config, "x.zarr", max_cells=10)) == 3


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ({"cells": [A, 12345]}, "cells not in the catalog: 12345"),
        ({"cells": ["not-a-word"]}, "morton words"),
        ({"max_cells": 0}, "max_cells must be at least 1, got 0"),
    ],
)
def test_a_bad_selection_is_named(catalog, selection, message):
    with pytest.raises(PlanError, match=message):
        plan_cells(catalog, load_config(), "x.zarr", **selection)


def test_a_catalog_of_another_order_is_refused(catalog):
    config = load_config().with_orders(7, 12)
    with pytest.raises(PlanError, match="order 6 but the config's output.parent_order is 7"):
        plan_cells(catalog, config, "x.zarr")


@pytest.mark.parametrize("mirror", ["s3://copies/atl06", "s3://copies/atl06/", "/data/atl06"])
def test_a_mirror_replaces_where_granules_are_read(catalog, mirror):
    (request,) = plan_cells(catalog, load_config(), "x.zarr", cells=[A], granule_mirror=mirror)
    base = mirror.rstrip("/")
    assert request.granule_urls == (f"{base}/{G1}", f"{base}/{G2}")


@pytest.mark.parametrize(
    ("mirror", "base"),
    [
        ("S3://copies/a/./atl06//", "s3://copies/a/atl06"),
        ("file:///data/atl06/", "file:///data/atl06"),
    ],
)
def test_a_mirror_is_normalised(catalog, mirror, base):
    (request,) = plan_cells(catalog, load_config(), "x.zarr", cells=[A], granule_mirror=mirror)
    assert request.granule_urls == (f"{base}/{G1}", f"{base}/{G2}")


@pytest.mark.parametrize(
    ("mirror", "message"),
    [
        ("https://copies.example/atl06", "neither a directory nor an s3:// prefix: scheme 'https'"),
        ("s3://Copies/atl06", "not a valid S3 bucket name"),
        ("", "granule_mirror is empty"),
    ],
)
def test_a_mirror_that_is_neither_a_directory_nor_a_bucket_is_refused(catalog, mirror, message):
    with pytest.raises(PlanError, match=message):
        plan_cells(catalog, load_config(), "x.zarr", granule_mirror=mirror)


def _with_granule(catalog: Catalog, name: str, s3: str) -> Catalog:
    cells = {**catalog.cells, B: (CatalogGranule(name=name, s3=s3, https=None),)}
    return Catalog(metadata=catalog.metadata, cells=cells)


@pytest.mark.parametrize(
    ("s3", "message"),
    [
        ("/etc/passwd", "scheme '' (a local path) is not accepted"),
        ("file:///etc/passwd", "scheme 'file' (a local file) is not accepted"),
        ("https://evil.example/x.h5", "scheme 'https' of host 'evil.example' is not accepted"),
    ],
)
def test_a_catalog_never_names_a_local_file(catalog, s3, message):
    """Local files are the operator's mirror only, never a catalog entry (which may come
    from anyone): the plan refuses it, naming the cell and the granule."""
    bad = _with_granule(catalog, G3, s3)
    with pytest.raises(PlanError, match=re.escape(f"catalog cell {B}: granule '{G3}': {message}")):
        plan_cells(bad, load_config(), "x.zarr")
    # With a mirror, the catalog's URL is not used; the request reads the mirror's copy.
    (request,) = plan_cells(bad, load_config(), "x.zarr", cells=[B], granule_mirror="/m")
    assert request.granule_urls == (f"/m/{G3}",)


def test_a_catalogs_nsidc_https_url_is_read_as_its_s3_object(catalog):
    https = f"https://data.nsidc.earthdatacloud.nasa.gov/nsidc-cumulus-prod-protected/x/{G3}"
    (request,) = plan_cells(_with_granule(catalog, G3, https), load_config(), "x.zarr", cells=[B])
    assert request.granule_urls == (f"s3://nsidc-cumulus-prod-protected/x/{G3}",)


@pytest.mark.parametrize("name", ["../../etc/passwd", "sub/x.h5", "..", "a\\b.h5", "x\n.h5"])
def test_a_catalog_granule_name_cannot_leave_the_mirror(catalog, name):
    bad = _with_granule(catalog, name, f"s3://nsidc-cumulus-prod-protected/{G3}")
    with pytest.raises(PlanError, match=f"catalog cell {B}: granule name .* is not a plain file"):
        plan_cells(bad, load_config(), "x.zarr", granule_mirror="/data/atl06")


@pytest.mark.parametrize("backend", ["lambda", "ecs"])
@pytest.mark.parametrize("mirror", ["/data/atl06", "file:///data/atl06", "rel/atl06"])
def test_a_local_mirror_is_for_the_local_backend_only(backend, mirror):
    with pytest.raises(PlanError, match=f"only the local backend reads: {backend} cells"):
        check_mirror(mirror, backend)
    check_mirror(mirror, "local")
    check_mirror("s3://copies/atl06", backend)
    check_mirror(None, backend)


def test_the_default_store_is_the_configs_for_the_cycle(catalog):
    config = load_config()
    assert config.output.store == "./magg-output/atl06-cycle{cycle}.zarr"
    assert store_url_for(config, catalog) == "./magg-output/atl06-cycle07.zarr"

    by_dates = Catalog(metadata={"parent_order": 6, "start": "2024-01-01"}, cells=catalog.cells)
    with pytest.raises(PlanError, match="needs a cycle"):
        store_url_for(config, by_dates)


def test_a_given_store_template_is_filled_with_the_cycle(catalog):
    config = load_config()
    cycle_7 = Catalog(metadata={**catalog.metadata, "cycle": 7}, cells=catalog.cells)
    assert store_url_for(config, cycle_7, "s3://b/c{cycle}.zarr") == "s3://b/c07.zarr"
    assert store_url_for(config, cycle_7, "s3://b/fixed.zarr") == "s3://b/fixed.zarr"
    assert cycle_store("s3://b/c{cycle}.zarr", 23) == "s3://b/c23.zarr"


def test_the_cell_timeout_fits_lambda_and_the_credentials_margin():
    assert MAX_CELL_TIMEOUT_S <= 900
    assert timedelta(seconds=MAX_CELL_TIMEOUT_S) <= DEFAULT_MARGIN
    assert check_cell_timeout(1) == 1
    assert check_cell_timeout(MAX_CELL_TIMEOUT_S) == MAX_CELL_TIMEOUT_S
    for bad in (0, -5, MAX_CELL_TIMEOUT_S + 1):
        with pytest.raises(PlanError, match="cell_timeout_s must be between 1 and 900"):
            check_cell_timeout(bad)
