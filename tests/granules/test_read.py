"""Reading one parent's points from granules: local files and S3 (moto), good and broken."""

from __future__ import annotations

import shutil

import h5py
import healpy
import mortie
import numpy as np
import pytest

from magg_core.access.s3 import S3Credentials
from magg_core.config import load_config
from magg_core.granules.h5driver import S3Access, shared_store
from magg_core.granules.read import GranuleReadError, read_granule, read_granules, row_spans
from magg_core.granules.sample import BEAMS, write_sample
from magg_core.schema import GranuleFailure, GranulePoints
from tests import oracle

CONFIG = load_config("atl06")
CYCLE_ONLY = load_config({k: v for k, v in CONFIG.to_dict().items() if k != "height_change"})
"""The built-in config without its ``height_change`` section: variables only, as before."""
VARIABLES = ("h_li", "h_li_sigma")
COLUMNS = (*VARIABLES, "latitude", "longitude", "time")
"""What a fragment keeps per point with the built-in config's ``height_change`` section."""
BUCKET = "magg-read-tests"
NORTHERN = int(mortie.norm2mort(0, 0, 6))  # a northern parent no Antarctic track touches


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("granules"), n_granules=4, seed=3)


@pytest.fixture(scope="module")
def reference(sample):
    """Good points of the sample by (granule, parent morton), from the independent oracle."""
    points = oracle.good_points(g.path for g in sample)
    parents = {
        int(p): oracle.parent_morton(int(p), 6) for p in np.unique(points["cell"].to_numpy() >> 12)
    }
    return points, parents


@pytest.fixture(scope="module")
def s3_urls(sample, moto_server, tmp_path_factory):
    moto_server.create_bucket(BUCKET)
    directory = sample[0].path.parent
    return moto_server.upload_dir(directory, BUCKET, "ATLAS/ATL06/007")


def expected(reference, granule, parent) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    points, _ = reference
    mine = oracle.points_in_parent(points[points["granule"] == granule.name], parent)
    columns = {v: mine[v].to_numpy() for v in COLUMNS if v != "time"}
    return mine["child"].to_numpy(), {**columns, "time": mine["delta_time"].to_numpy()}


def canonical(child, columns) -> tuple[np.ndarray, ...]:
    """Rows in a fixed order so two readings compare regardless of beam order."""
    order = np.lexsort((columns["h_li_sigma"], columns["h_li"], child))
    names = COLUMNS if "time" in columns else VARIABLES
    return (child[order], *(columns[v][order] for v in names))


def rows_inside(path, parent_id: int) -> dict[str, np.ndarray]:
    """Every row (good or not) of each beam inside a parent, by healpy."""
    rows = {}
    with h5py.File(path, "r") as f:
        for beam in (b for b in BEAMS if b in f):
            g = f[beam]["land_ice_segments"]
            cell = healpy.ang2pix(
                4096,
                g["longitude"][:],
                mortie.geodetic_to_authalic(g["latitude"][:]),
                nest=True,
                lonlat=True,
            )
            rows[beam] = np.flatnonzero((cell >> 12) == parent_id)
    return rows


def compressed_bytes(path, beam: str, name: str, rows: np.ndarray | None = None) -> int:
    """Stored size of the chunks of one dataset (only those holding ``rows`` if given)."""
    with h5py.File(path, "r") as f:
        dset = f[beam]["land_ice_segments"][name]
        total = 0
        for i in range(dset.id.get_num_chunks()):
            info = dset.id.get_chunk_info(i)
            first = info.chunk_offset[0]
            if rows is None or np.any((rows >= first) & (rows < first + dset.chunks[0])):
                total += info.size
        return total


# --- the happy path -----------------------------------------------------------------


def test_reads_exactly_the_good_rows_inside_each_parent(sample, reference):
    _, parents = reference
    compared = 0
    for granule in sample:
        for parent in parents.values():
            got = read_granule(str(granule.path), parent, CONFIG)
            child, columns = expected(reference, granule, parent)
            assert got.child_index.dtype == np.int64
            assert got.columns["h_li"].dtype == np.float32
            assert set(got.columns) == set(COLUMNS)
            assert all(got.columns[c].dtype == np.float64 for c in COLUMNS[2:])
            for a, b in zip(
                canonical(got.child_index, got.columns), canonical(child, columns), strict=True
            ):
                np.testing.assert_array_equal(a, b)
            compared += len(got)
    assert compared == len(reference[0]), "every good point belongs to exactly one parent"


def test_granule_lacking_a_beam_reads_the_other_beams(sample, reference):
    granule = sample[1]
    with h5py.File(granule.path, "r") as f:
        assert "gt2r" not in f
    points, parents = reference
    here = points[points["granule"] == granule.name]
    parent = parents[int(here["cell"].iloc[len(here) // 2]) >> 12]
    got = read_granule(str(granule.path), parent, CONFIG)
    child, columns = expected(reference, granule, parent)
    assert len(got) == child.size > 0
    np.testing.assert_array_equal(
        canonical(got.child_index, got.columns)[1], canonical(child, columns)[1]
    )


def test_file_url_reads_like_a_path(sample, reference):
    _, parents = reference
    parent = next(iter(parents.values()))
    by_path = read_granule(str(sample[0].path), parent, CONFIG)
    by_url = read_granule(sample[0].path.as_uri(), parent, CONFIG)
    np.testing.assert_array_equal(by_path.child_index, by_url.child_index)
    np.testing.assert_array_equal(by_path.columns["h_li"], by_url.columns["h_li"])


def test_parent_without_points_gives_empty_columns(sample):
    got = read_granule(str(sample[0].path), NORTHERN, CONFIG)
    assert len(got) == 0 and got.child_index.dtype == np.int64
    assert {k: v.size for k, v in got.columns.items()} == dict.fromkeys(COLUMNS, 0)
    assert got.bytes_fetched > 0, "the coordinates had to be read to know"


def test_without_height_change_the_points_keep_only_the_variables(sample, reference):
    """A config without ``height_change`` reads and keeps what it did before the section existed."""
    _, parents = reference
    parent = next(iter(parents.values()))
    full = read_granule(str(sample[0].path), parent, CONFIG)
    plain = read_granule(str(sample[0].path), parent, CYCLE_ONLY)
    assert set(plain.columns) == set(VARIABLES) and len(plain) == len(full) > 0
    for name in VARIABLES:
        np.testing.assert_array_equal(plain.columns[name], full.columns[name])
    assert plain.bytes_fetched < full.bytes_fetched, "delta_time is read only when asked for"


def test_fetches_little_more_than_the_chunks_holding_the_rows(sample, reference):
    """Bytes fetched <= 1.5x the compressed chunks that hold the cell's rows.

    A target of docs/architecture.md §Targets."""
    _, parents = reference
    best = None
    for granule in sample:
        for parent_id, parent in parents.items():
            rows = rows_inside(granule.path, parent_id)
            if sum(r.size for r in rows.values()) == 0:
                continue
            needed = sum(
                compressed_bytes(
                    granule.path, beam, name, r if name not in ("latitude", "longitude") else None
                )
                for beam, r in rows.items()
                for name in ("latitude", "longitude", "h_li", "h_li_sigma", "atl06_quality_summary")
                if name in ("latitude", "longitude") or r.size
            )
            everything = sum(
                compressed_bytes(granule.path, beam, name)
                for beam in rows
                for name in ("latitude", "longitude", "h_li", "h_li_sigma", "atl06_quality_summary")
            )
            if best is None or needed / everything < best[0]:
                best = (needed / everything, granule, parent, needed, everything)
    _, granule, parent, needed, everything = best
    got = read_granule(str(granule.path), parent, CONFIG)
    assert got.bytes_fetched <= 1.5 * needed
    assert got.bytes_fetched < everything, "only the chunks holding the parent's rows are read"


def test_row_spans_skip_only_whole_unneeded_chunks():
    assert row_spans(np.array([], dtype=np.int64), 10) == ()
    assert row_spans(np.array([3, 4, 5]), 10) == ((3, 6),)
    # chunks 0 and 1 touch: one span; chunk 3 is two chunks on: a second span
    assert row_spans(np.array([8, 9, 12, 35, 36]), 10) == ((8, 13), (35, 37))
    # a gap inside one chunk or across a chunk boundary costs nothing: keep one span
    assert row_spans(np.array([0, 9, 10, 19]), 10) == ((0, 20),)
    assert row_spans(np.array([0, 25]), 10) == ((0, 1), (25, 26))


def test_track_leaving_and_reentering_a_parent_is_read_in_two_spans(sample, tmp_path):
    """A beam whose rows in the parent sit in chunks 0 and 3 needs two hyperslices."""
    with h5py.File(sample[0].path, "r") as f:
        g = f["gt1l/land_ice_segments"]
        lat, lon = g["latitude"][:10_000], g["longitude"][:10_000]
    parent = int(mortie.clip2order(6, mortie.geo2mort(lat[5000:5001], lon[5000:5001], order=18))[0])
    far_lat, far_lon = np.full(20_000, -60.0), np.full(20_000, -10.0)
    n = 40_000
    rng = np.random.default_rng(0)
    h = rng.normal(3000.0, 1.0, n).astype(np.float32)
    sigma = rng.uniform(0.02, 0.5, n).astype(np.float32)
    quality = np.zeros(n, dtype=np.int8)
    quality[::7] = 1
    path = tmp_path / "reentering.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("gt1l/land_ice_segments")
        columns = {
            "latitude": np.r_[lat, far_lat, lat],
            "longitude": np.r_[lon, far_lon, lon],
            "h_li": h,
            "h_li_sigma": sigma,
            "atl06_quality_summary": quality,
        }
        for name, data in columns.items():
            g.create_dataset(name, data=data, chunks=(10_000,), compression="gzip", shuffle=True)
    inside = rows_inside(path, int(mortie.mort2healpix(np.uint64(parent))[0]))["gt1l"]
    assert inside.min() < 10_000 and inside.max() >= 30_000
    assert len(row_spans(inside, 10_000)) == 2
    got = read_granule(str(path), parent, CYCLE_ONLY)  # the file has no delta_time
    good = inside[quality[inside] == 0]
    np.testing.assert_array_equal(np.sort(got.columns["h_li"]), np.sort(h[good]))
    two_chunks = sum(
        compressed_bytes(path, "gt1l", v, inside)
        for v in ("h_li", "h_li_sigma", "atl06_quality_summary")
    )
    all_chunks = sum(
        compressed_bytes(path, "gt1l", v) for v in ("h_li", "h_li_sigma", "atl06_quality_summary")
    )
    coordinates = sum(compressed_bytes(path, "gt1l", v) for v in ("latitude", "longitude"))
    assert got.bytes_fetched <= 1.5 * (coordinates + two_chunks)
    assert got.bytes_fetched < coordinates + all_chunks


# --- S3 -----------------------------------------------------------------------------


def test_s3_reads_equal_local_reads(sample, reference, s3_urls, moto_server):
    _, parents = reference
    local = [str(g.path) for g in sample]
    chosen = list(parents.values())
    for parent in (chosen[0], chosen[len(chosen) // 2]):
        from_disk, disk_failures = read_granules(local, parent, CONFIG)
        from_s3, s3_failures = read_granules(
            s3_urls,
            parent,
            CONFIG,
            credentials=moto_server.credentials,
            endpoint=moto_server.endpoint,
        )
        assert disk_failures == s3_failures == []
        assert [p.url for p in from_s3] == s3_urls
        for a, b in zip(from_disk, from_s3, strict=True):
            np.testing.assert_array_equal(a.child_index, b.child_index)
            for v in VARIABLES:
                np.testing.assert_array_equal(a.columns[v], b.columns[v])
            assert a.bytes_fetched == b.bytes_fetched, "same reads, whichever driver"


def test_one_store_serves_every_granule_of_a_bucket(moto_server):
    access = S3Access(moto_server.credentials, moto_server.endpoint)
    assert shared_store(BUCKET, access) is shared_store(
        BUCKET, S3Access(moto_server.credentials, moto_server.endpoint)
    )
    other = S3Access(S3Credentials("AKIAOTHER", "other-secret"), moto_server.endpoint)
    assert shared_store(BUCKET, other) is not shared_store(BUCKET, access)


# --- broken granules ----------------------------------------------------------------


def broken_copies(sample, directory) -> dict[str, tuple[str, str]]:
    """Broken variants of a granule, each with the words its error must contain."""
    original = sample[0].path
    data = original.read_bytes()
    cases = {}
    (directory / "truncated.h5").write_bytes(data[: len(data) // 2])
    cases["truncated.h5"] = "truncated"
    (directory / "corrupt.h5").write_bytes(np.random.default_rng(7).bytes(len(data) // 4))
    cases["corrupt.h5"] = "not an HDF5 file"
    for name, dataset in (
        ("no_sigma.h5", "gt1r/land_ice_segments/h_li_sigma"),
        ("no_quality.h5", "gt3l/land_ice_segments/atl06_quality_summary"),
        ("no_latitude.h5", "gt2l/land_ice_segments/latitude"),
    ):
        shutil.copy(original, directory / name)
        with h5py.File(directory / name, "a") as f:
            del f[dataset]
        cases[name] = f"dataset {dataset} is missing"
    return cases


@pytest.fixture(scope="module")
def broken(sample, reference, moto_server, s3_urls, tmp_path_factory):
    directory = tmp_path_factory.mktemp("broken")
    cases = broken_copies(sample, directory)
    moto_server.upload_dir(directory, BUCKET, "broken")
    _, parents = reference
    # a parent that every beam of granule 0 crosses, so each broken dataset is needed
    rows = {p: rows_inside(sample[0].path, pid) for pid, p in parents.items()}
    parent = max(rows, key=lambda p: min(r.size for r in rows[p].values()))
    return directory, cases, parent


@pytest.mark.parametrize("where", ["local", "s3"])
def test_broken_granules_raise_a_clear_reason(broken, moto_server, where):
    directory, cases, parent = broken
    cases = {**cases, "nonexistent.h5": "not found"}
    for name, words in cases.items():
        url = str(directory / name) if where == "local" else f"s3://{BUCKET}/broken/{name}"
        with pytest.raises(GranuleReadError) as caught:
            read_granule(
                url,
                parent,
                CONFIG,
                credentials=moto_server.credentials,
                endpoint=moto_server.endpoint,
            )
        error = caught.value
        assert error.url == url
        assert words in error.reason, (name, error.reason)
        assert "\n" not in error.reason and len(error.reason) < 400
        for secret in moto_server.credentials.secrets():
            assert secret not in str(error) and secret not in repr(error)


def test_missing_bucket_is_reported_as_not_found(moto_server):
    with pytest.raises(GranuleReadError, match="not found"):
        read_granule(
            "s3://no-such-bucket-here/x.h5",
            NORTHERN,
            CONFIG,
            credentials=moto_server.credentials,
            endpoint=moto_server.endpoint,
        )


def test_unsupported_scheme_is_a_read_error():
    with pytest.raises(GranuleReadError) as caught:
        read_granule("https://example.com/ATL06_x.h5", NORTHERN, CONFIG)
    assert caught.value.reason.startswith("cannot open: unsupported URL scheme 'https'")


def test_read_granules_reports_failures_per_url_and_keeps_the_good(
    sample, broken, s3_urls, moto_server
):
    directory, _, parent = broken
    urls = [
        s3_urls[0],
        f"s3://{BUCKET}/broken/truncated.h5",
        s3_urls[2],
        f"s3://{BUCKET}/broken/missing.h5",
        f"s3://{BUCKET}/broken/no_sigma.h5",
    ]
    points, failures = read_granules(
        urls,
        parent,
        CONFIG,
        credentials=moto_server.credentials,
        endpoint=moto_server.endpoint,
        max_workers=3,
    )
    assert [p.url for p in points] == [urls[0], urls[2]]
    assert all(isinstance(p, GranulePoints) for p in points)
    assert [f.url for f in failures] == [urls[1], urls[3], urls[4]]
    assert all(isinstance(f, GranuleFailure) for f in failures)
    assert "truncated" in failures[0].reason and "not found" in failures[1].reason
    text = (
        repr(points)
        + repr(failures)
        + repr(S3Access(moto_server.credentials, moto_server.endpoint))
    )
    for secret in moto_server.credentials.secrets():
        assert secret not in text


def test_read_granules_is_deterministic_whatever_the_concurrency(sample, reference):
    _, parents = reference
    urls = [str(g.path) for g in sample]
    parent = list(parents.values())[len(parents) // 2]
    one, _ = read_granules(urls, parent, CONFIG, max_workers=1)
    many, _ = read_granules(urls, parent, CONFIG, max_workers=8)
    assert [p.url for p in one] == [p.url for p in many] == urls
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a.child_index, b.child_index)
        np.testing.assert_array_equal(a.columns["h_li"], b.columns["h_li"])


def test_read_granules_of_nothing_is_nothing():
    assert read_granules([], NORTHERN, CONFIG) == ([], [])
