"""Every granule layout NSIDC serves reads exactly as the h5py oracle reads it, locally and on S3.

Release 006's layout and release 007's cloud-optimized one (paged
aggregation, unlimited dimension, 100,000-row chunks, creation-order-tracked
groups, dimension scales), as h5py writes it and after ``h5repack``; and beams
whose datasets exist with zero rows, in every way a beam can be partly or
wholly empty.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from magg_core.config import load_config
from magg_core.granules.read import read_granule, read_granules
from magg_core.granules.sample import BEAMS, FILL_VALUE, write_sample
from tests import oracle

CONFIG = load_config("atl06")
VARIABLES = ("h_li", "h_li_sigma")
BUCKET = "magg-layout-tests"
LAYOUTS = {
    "r006": {"layout": "r006"},
    "r007": {"layout": "r007"},
    "r007-repacked": {"layout": "r007", "repack": True},
    "r007-10k-repacked": {"layout": "r007", "chunk_rows": 10_000, "repack": True},
}
"""The h5repack variants need ``h5repack`` (Debian package hdf5-tools): no skipping."""


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Two granules per layout, the same passes and values in each (the second lacks a beam)."""
    root = tmp_path_factory.mktemp("layouts")
    return {
        name: write_sample(root / name, n_granules=2, seed=11, extent_km=200.0, **options)
        for name, options in LAYOUTS.items()
    }


@pytest.fixture(scope="module")
def reference(samples):
    """The oracle's good points of the r006 granules (the values do not depend on the layout)."""
    return oracle.good_points(g.path for g in samples["r006"])


@pytest.fixture(scope="module")
def parents(reference):
    return [oracle.parent_morton(int(p), 6) for p in np.unique(reference["cell"].to_numpy() >> 12)]


@pytest.fixture(scope="module")
def busiest(reference):
    """The parent with the most good points of both granules.

    One parent only on S3: moto reads a whole object for every ranged GET,
    ~45 ms for a 32 MiB release-007 granule, so each parent costs seconds.
    """
    parent_ids = reference["cell"].to_numpy() >> 12
    both = [
        p for p in np.unique(parent_ids) if reference[parent_ids == p]["granule"].nunique() == 2
    ]
    best = max(both, key=lambda p: np.count_nonzero(parent_ids == p))
    return oracle.parent_morton(int(best), 6)


@pytest.fixture(scope="module")
def bucket(moto_server):
    if BUCKET not in {b["Name"] for b in moto_server.client.list_buckets()["Buckets"]}:
        moto_server.create_bucket(BUCKET)
    return moto_server


def canonical(child, columns) -> tuple[np.ndarray, ...]:
    """Rows in a fixed order so two readings compare regardless of beam order."""
    order = np.lexsort((columns["h_li_sigma"], columns["h_li"], child))
    return (child[order], *(columns[v][order] for v in VARIABLES))


def assert_reads_like_oracle(got, points, parent) -> int:
    """``got`` holds exactly the oracle's ``points`` inside ``parent``; returns their number."""
    mine = oracle.points_in_parent(points, parent)
    want = canonical(mine["child"].to_numpy(), {v: mine[v].to_numpy() for v in VARIABLES})
    for a, b in zip(canonical(got.child_index, got.columns), want, strict=True):
        np.testing.assert_array_equal(a, b)
    return len(got)


# --- release layouts ----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_like_the_oracle_from_local_files(samples, reference, parents, layout):
    total = 0
    for granule in samples[layout]:
        points = reference[reference["granule"] == granule.name]
        for parent in parents:
            total += assert_reads_like_oracle(
                read_granule(str(granule.path), parent, CONFIG), points, parent
            )
    assert total == len(reference) > 10_000, "every good point, each in one parent"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_like_the_oracle_from_s3(samples, reference, busiest, bucket, layout):
    urls = bucket.upload_dir(samples[layout][0].path.parent, BUCKET, layout)
    local = [str(g.path) for g in samples[layout]]
    from_s3, failures = read_granules(
        urls, busiest, CONFIG, credentials=bucket.credentials, endpoint=bucket.endpoint
    )
    assert failures == []
    from_disk, _ = read_granules(local, busiest, CONFIG)
    total = 0
    for got, granule, disk in zip(from_s3, samples[layout], from_disk, strict=True):
        points = reference[reference["granule"] == granule.name]
        total += assert_reads_like_oracle(got, points, busiest)
        assert got.bytes_fetched == disk.bytes_fetched, "same reads, whichever driver"
    assert total == len(oracle.points_in_parent(reference, busiest)) > 0


def test_r007_chunks_larger_than_a_beam_cost_one_fetch_per_dataset(samples, parents):
    """A 100,000-row chunk holds a whole sample beam: each dataset is one ranged read."""
    granule = samples["r007"][0]
    with h5py.File(granule.path, "r") as f:
        assert f["gt1l/land_ice_segments/h_li"].chunks[0] > f["gt1l/land_ice_segments/h_li"].size
        assert f["gt1l/land_ice_segments/h_li"].id.get_num_chunks() == 1
    got = [read_granule(str(granule.path), p, CONFIG) for p in parents]
    one_chunk = [g for g in got if len(g)]
    assert one_chunk
    many_chunks = [read_granule(str(samples["r006"][0].path), p, CONFIG) for p in parents]
    assert max(g.requests for g in one_chunk) <= max(g.requests for g in many_chunks)


# --- beams with zero-row datasets ---------------------------------------------------


def empty_like(group: h5py.Group, name: str, *, chunked: bool) -> None:
    """Replace dataset ``name`` by one of the same type with zero rows (no storage at all)."""
    dtype = group[name].dtype
    del group[name]
    if chunked:
        group.create_dataset(
            name,
            shape=(0,),
            dtype=dtype,
            maxshape=(None,),
            chunks=(10_000,),
            compression="gzip",
            shuffle=True,
        )
    else:
        group.create_dataset(name, shape=(0,), dtype=dtype)


EMPTY_CASES = {
    # name: (base layout, beam, datasets emptied, chunked)
    "whole beam, chunked (r007)": ("r007", "gt2l", "all", True),
    "whole beam, contiguous": ("r006", "gt1l", "all", False),
    "one variable": ("r006", "gt3r", ("h_li_sigma",), True),
    "quality flag only": ("r007-repacked", "gt1r", ("atl06_quality_summary",), True),
    "latitude only": ("r006", "gt2l", ("latitude",), False),
    "longitude and h_li": ("r007", "gt3l", ("longitude", "h_li"), True),
}


@pytest.fixture(scope="module")
def empty_beams(samples, tmp_path_factory):
    """Copies of granule 0 of a layout with one beam's datasets (some or all) emptied."""
    directory = tmp_path_factory.mktemp("empty")
    copies = {}
    for i, (case, (layout, beam, names, chunked)) in enumerate(EMPTY_CASES.items()):
        original = samples[layout][0].path
        path = directory / f"case{i}" / original.name
        path.parent.mkdir()
        shutil.copy(original, path)
        with h5py.File(path, "a") as f:
            group = f[f"{beam}/land_ice_segments"]
            for name in list(group) if names == "all" else names:
                empty_like(group, name, chunked=chunked)
        copies[case] = (path, beam)
    return copies


@pytest.mark.parametrize("case", EMPTY_CASES)
def test_a_beam_with_a_zero_row_dataset_gives_no_points_and_the_others_are_read(
    empty_beams, reference, parents, case
):
    path, beam = empty_beams[case]
    points = reference[(reference["granule"] == path.name) & (reference["beam"] != beam)]
    assert (reference[reference["granule"] == path.name]["beam"] == beam).any()
    total = 0
    for parent in parents:
        total += assert_reads_like_oracle(read_granule(str(path), parent, CONFIG), points, parent)
    assert total == len(points)


def test_zero_row_beams_read_from_s3(empty_beams, reference, busiest, bucket):
    path, beam = empty_beams["whole beam, chunked (r007)"]
    [url] = bucket.upload_dir(path.parent, BUCKET, "empty")
    points = reference[(reference["granule"] == path.name) & (reference["beam"] != beam)]
    got = read_granule(
        url, busiest, CONFIG, credentials=bucket.credentials, endpoint=bucket.endpoint
    )
    assert assert_reads_like_oracle(got, points, busiest) > 0


def test_a_granule_whose_every_beam_is_empty_has_no_points(samples, parents, tmp_path):
    path = tmp_path / samples["r007"][0].name
    shutil.copy(samples["r007"][0].path, path)
    with h5py.File(path, "a") as f:
        for beam in BEAMS:
            group = f[f"{beam}/land_ice_segments"]
            for name in list(group):
                empty_like(group, name, chunked=True)
    for parent in parents[:3]:
        got = read_granule(str(path), parent, CONFIG)
        assert len(got) == 0 and set(got.columns) == set(CONFIG.point_columns)


def test_a_dataset_never_written_reads_as_its_fill_value(samples, parents, tmp_path):
    """Rows exist but storage was never allocated (undefined address): every row is fill."""
    path = tmp_path / samples["r006"][0].name
    shutil.copy(samples["r006"][0].path, path)
    with h5py.File(path, "a") as f:
        group = f["gt2r/land_ice_segments"]
        n = group["h_li"].shape[0]
        del group["h_li"]
        group.create_dataset(
            "h_li",
            shape=(n,),
            dtype=np.float32,
            chunks=(10_000,),
            maxshape=(None,),
            fillvalue=FILL_VALUE,
        )
        assert group["h_li"].id.get_num_chunks() == 0
    points = oracle.good_points([path])
    assert len(points) and not (points["beam"] == "gt2r").any()
    total = sum(
        assert_reads_like_oracle(read_granule(str(path), p, CONFIG), points, p) for p in parents
    )
    assert total == len(points)


def test_reading_a_granule_lacking_a_beam_logs_nothing(samples, parents, caplog):
    """h5coro's logger stays silent on our path (its own dataset reader warns on a missing beam)."""
    granule = samples["r007-repacked"][1]
    with h5py.File(granule.path, "r") as f:
        assert set(BEAMS) - set(f)
    with caplog.at_level("DEBUG"):
        points = sum(len(read_granule(str(granule.path), p, CONFIG)) for p in parents)
    assert points > 0
    assert [r for r in caplog.records if r.name.startswith("h5coro")] == []
