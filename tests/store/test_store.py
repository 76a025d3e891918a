"""The Zarr store, on real local directories and a moto S3 server on loopback."""

from __future__ import annotations

import json
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import healpy
import numpy as np
import pytest
import xarray as xr
import xdggs  # noqa: F401  (registers the .dggs accessor)
import zarr
from zarr.storage import LocalStore, ObjectStore

from magg_core.config import load_config
from magg_core.morton import children, parent_of, point_morton
from magg_core.schema import CellResult, GranuleFailure, Timings
from magg_core.store import arrays as magg_store
from magg_core.store.arrays import (
    ArraySpec,
    TemplateMismatchError,
    check_template,
    chunk_index,
    consolidate,
    create_template,
    open_store,
    read_template,
    write_cell,
)
from magg_core.store.records import CellRecord, input_fingerprint, read_records, write_record

# Points on the Antarctic ice sheet, 75-85°S, spread in longitude.
LATS = np.array([-75.3, -76.8, -78.1, -79.6, -81.2, -82.7, -84.4])
LONS = np.array([12.0, 101.5, -61.0, 168.0, -119.0, 45.5, -3.0])

WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)


def authalic(lat_deg: np.ndarray) -> np.ndarray:
    """Exact (closed-form) authalic latitude of a WGS84 geodetic latitude, in degrees."""
    e = np.sqrt(WGS84_E2)

    def q(phi):
        s = np.sin(phi)
        log_term = np.log((1 - e * s) / (1 + e * s)) / (2 * e)
        return (1 - WGS84_E2) * (s / (1 - WGS84_E2 * s * s) - log_term)

    return np.degrees(np.arcsin(q(np.radians(lat_deg)) / q(np.pi / 2)))


@pytest.fixture(scope="module")
def config():
    return load_config()


@pytest.fixture(scope="module")
def parents(config):
    out = config.output
    words = parent_of(point_morton(LATS, LONS, out.child_order), out.parent_order)
    assert np.unique(words).size == LATS.size
    return np.sort(words)


def stats_for(config, seed: int, coverage: float = 0.3) -> dict[str, np.ndarray]:
    """Plausible statistics for one parent: heights in ``coverage`` of children, fill elsewhere."""
    rng = np.random.default_rng(seed)
    n = config.output.children_per_parent
    has_data = rng.random(n) < coverage
    out = {}
    for stat in config.aggregation.statistics:
        if stat.name == "count":
            out[stat.name] = np.where(has_data, rng.integers(1, 50, n), 0).astype(stat.dtype)
        else:
            values = 1500 + 40 * rng.standard_normal(n)
            out[stat.name] = np.where(has_data, values, np.nan).astype(stat.dtype)
    return out


def local_files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a store directory: bytes and modification time (ns)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def s3_objects(moto, bucket: str, prefix: str) -> dict[str, tuple[bytes, str]]:
    """Every object under a prefix: bytes and ETag."""
    out = {}
    pages = moto.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            body = moto.client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(prefix) :]] = (body, obj["ETag"])
    return out


def without_creation_stamp(document: bytes) -> dict:
    """A group's zarr.json without the template's creation time and id (unique per creation)."""

    def strip(node):
        if isinstance(node, dict):
            is_stamp = "config_hash" in node  # the template's provenance mapping
            return {
                k: strip(v) for k, v in node.items() if not (is_stamp and k in ("created", "id"))
            }
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    doc = json.loads(document)
    assert "created" in json.dumps(doc)
    return strip(doc)


@pytest.fixture
def local(tmp_path):
    path = tmp_path / "out.zarr"
    return path, open_store(str(path))


@pytest.fixture
def templated(local, config, parents):
    path, store = local
    create_template(store, config, parents, {"catalog": {"cycle": 7, "short_name": "ATL06"}})
    return path, store


# --- open_store ---------------------------------------------------------------


def test_open_store_by_url_kind(tmp_path, moto_server):
    assert isinstance(open_store(str(tmp_path / "a.zarr")), LocalStore)
    from_url = open_store((tmp_path / "b.zarr").as_uri(), read_only=True)
    assert isinstance(from_url, LocalStore) and from_url.read_only
    assert Path(from_url.root) == tmp_path / "b.zarr"
    s3 = open_store(
        "s3://bucket/run/out.zarr",
        credentials=moto_server.credentials,
        endpoint=moto_server.endpoint,
    )
    assert isinstance(s3, ObjectStore)
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("gs://bucket/out.zarr")


# --- template -----------------------------------------------------------------


@pytest.mark.parametrize("small_batches", [False, True], ids=["default", "many-shards-and-blocks"])
def test_template_has_coordinates_of_every_parent(
    local, config, parents, small_batches, monkeypatch
):
    if small_batches:  # exercise shard and write-block boundaries with a handful of parents
        monkeypatch.setattr(magg_store, "COORDINATE_SHARD_PARENTS", 2)
        monkeypatch.setattr(magg_store, "WRITE_BLOCK_PARENTS", 4)
    path, store = local
    create_template(store, config, parents, {})
    n = config.output.children_per_parent
    group = zarr.open_group(store, path="12", mode="r")
    cell_ids, morton = group["cell_ids"][:], group["morton"][:]
    assert cell_ids.dtype == morton.dtype == np.uint64
    assert cell_ids.shape == (parents.size * n,)

    # Independent of mortie: healpy's order-6 id of each point, and its 4,096
    # contiguous nested children at order 12.
    order6 = healpy.ang2pix(64, LONS, authalic(LATS), nest=True, lonlat=True)
    by_parent = dict(
        zip(parent_of(point_morton(LATS, LONS, 12), 6).tolist(), order6.tolist(), strict=True)
    )
    for i, parent in enumerate(parents.tolist()):
        chunk = slice(i * n, (i + 1) * n)
        expected_ids = by_parent[parent] * n + np.arange(n, dtype=np.uint64)
        np.testing.assert_array_equal(cell_ids[chunk], expected_ids)
        np.testing.assert_array_equal(morton[chunk], children(parent, 12))
        assert np.all(parent_of(morton[chunk], 6) == parent)

    for stat in config.aggregation.statistics:
        array = group[stat.name]
        assert array.dtype == stat.dtype
        assert array.chunks == (n,)
        assert array.metadata.dimension_names == ("cells",)
        assert array.attrs["coordinates"] == "cell_ids morton"
        assert array.nchunks_initialized == 0  # nothing written but metadata
    assert group["cell_ids"].metadata.dimension_names == ("cells",)

    attrs = group.attrs["magg"]
    assert attrs["config_hash"] == config.hash
    assert attrs["config"] == config.to_dict()
    assert attrs["n_parents"] == parents.size
    assert [int(p) for p in attrs["parents"]] == parents.tolist()
    assert (attrs["parent_order"], attrs["child_order"]) == (6, 12)


def test_store_decodes_with_xarray_and_xdggs(templated, config, parents):
    path, store = templated
    n = config.output.children_per_parent
    written = {1: stats_for(config, 1), 4: stats_for(config, 4)}
    for idx, stats in written.items():
        write_cell(store, config, idx, stats)
    consolidate(store)
    assert zarr.open_group(store, mode="r").metadata.consolidated_metadata is not None

    ds = xr.open_zarr(store, group="12", consolidated=True)
    assert set(ds.coords) == {"cell_ids", "morton"}
    assert set(ds.data_vars) == {s.name for s in config.aggregation.statistics}

    per_variable = xdggs.decode(ds)
    zarr_convention = ds.dggs.decode(convention="zarr")
    for decoded in (per_variable, zarr_convention):
        info = decoded.dggs.grid_info
        assert (info.level, info.indexing_scheme) == (12, "nested")
        # WGS84's defining parameters (NIMA TR8350.2, table 3.1).
        assert (info.ellipsoid.name, info.ellipsoid.semimajor_axis) == ("WGS84", 6378137.0)
        assert info.ellipsoid.inverse_flattening == 298.257223563

    centres = zarr_convention.dggs.cell_centers()
    ids = ds["cell_ids"].values.astype(np.int64)
    lon, lat = healpy.pix2ang(2**12, ids, nest=True, lonlat=True)  # sphere: authalic latitude
    # xdggs (healpix-geo, ellipsoid WGS84) returns *geodetic* latitude.
    geodetic = centres["latitude"].values
    assert np.abs(geodetic - lat).max() > 0.01
    np.testing.assert_allclose(authalic(geodetic), lat, rtol=0, atol=1e-9)
    dlon = (centres["longitude"].values - lon + 180) % 360 - 180
    assert np.abs(dlon).max() < 1e-9

    for idx in range(parents.size):
        chunk = slice(idx * n, (idx + 1) * n)
        for stat in config.aggregation.statistics:
            got = ds[stat.name].values[chunk]
            if idx in written:
                np.testing.assert_array_equal(got, written[idx][stat.name])
            elif stat.name == "count":
                assert np.all(got == 0)
            else:
                assert np.all(np.isnan(got))


def test_create_template_again_is_a_no_op(templated, config, parents):
    path, store = templated
    before = local_files(path)
    create_template(store, config, parents, {"catalog": {"cycle": 8}})
    assert local_files(path) == before


def test_mismatched_template_raises_and_writes_nothing(templated, config, parents):
    path, store = templated
    before = local_files(path)

    raw = config.to_dict()
    raw["aggregation"]["statistics"]["h_min"]["dtype"] = "float64"
    other = load_config(raw)
    with pytest.raises(TemplateMismatchError, match=r"aggregation\.statistics\.h_min\.dtype"):
        create_template(store, other, parents, {})

    with pytest.raises(TemplateMismatchError, match="7 parent cells, this run 6"):
        create_template(store, config, parents[:-1], {})
    swapped = parents.copy()
    swapped[2] = parent_of(point_morton(np.array([-86.0]), np.array([77.0]), 12), 6)[0]
    swapped = np.sort(swapped)
    first = int(np.flatnonzero(swapped != parents)[0])
    with pytest.raises(
        TemplateMismatchError,
        match=f"first difference at position {first}: "
        f"store {parents[first]}, this run {swapped[first]}",
    ):
        create_template(store, config, swapped, {})

    assert local_files(path) == before


def test_template_with_other_arrays(local, config, parents):
    """Products on the same grid (height change) declare their own arrays."""
    path, store = local
    arrays = (
        ArraySpec("dhdt", np.dtype("float32"), np.nan, {"units": "m/yr"}),
        ArraySpec("n_points", np.dtype("int32"), 0),
    )
    create_template(store, config, parents, {}, arrays=arrays)
    n = config.output.children_per_parent
    values = {"dhdt": np.full(n, -0.5, np.float32), "n_points": np.arange(n, dtype=np.int32)}
    write_cell(store, config, 1, values, arrays=arrays)
    group = zarr.open_group(store, path=str(config.output.child_order), mode="r")
    assert sorted(group.array_keys()) == ["cell_ids", "dhdt", "morton", "n_points"]
    assert group["dhdt"].attrs["units"] == "m/yr"
    np.testing.assert_array_equal(group["n_points"][n : 2 * n], values["n_points"])
    assert np.isnan(group["dhdt"][:n]).all()
    with pytest.raises(ValueError, match="missing"):
        write_cell(store, config, 0, values)  # the statistics are not this store's arrays

    before = local_files(path)
    with pytest.raises(TemplateMismatchError, match=r"arrays \['dhdt', 'n_points'\]"):
        create_template(store, config, parents, {})
    assert local_files(path) == before


def test_template_rejects_bad_input_before_writing(local, config, parents):
    path, store = local
    child_word = point_morton(LATS[:1], LONS[:1], 12)[0]
    for bad, message in [
        (parents[::-1], "ascending"),
        (np.repeat(parents[:2], 2), "unique"),
        (np.sort(np.append(parents, child_word)), "not at order 6"),
        (parents[:0], "at least one"),
    ]:
        with pytest.raises(ValueError, match=message):
            create_template(store, config, bad, {})
    with pytest.raises(ValueError, match="JSON"):
        create_template(store, config, parents, {"catalog": {"area": float("nan")}})
    assert not path.exists()


def test_unfinished_template_is_rejected_then_rebuilt(local, config, parents):
    path, store = local
    # What a crash before the commit marker leaves: the group and an array, no attributes.
    zarr.open_group(store, mode="w").create_group("12").create_array(
        "leftover", shape=(4,), dtype="int8"
    )
    with pytest.raises(TemplateMismatchError, match="no finished template"):
        check_template(store, config, int(parents[0]), 0)

    create_template(store, config, parents, {})
    check_template(store, config, int(parents[0]), 0)
    assert "leftover" not in zarr.open_group(store, path="12", mode="r")


# --- checks -------------------------------------------------------------------


def test_chunk_index_and_check_template(templated, config, parents):
    _, store = templated
    for i, parent in enumerate(parents.tolist()):
        assert chunk_index(store, config, parent) == i
        check_template(store, config, parent, i)

    outsider = int(parent_of(point_morton(np.array([-86.0]), np.array([77.0]), 12), 6)[0])
    with pytest.raises(TemplateMismatchError, match="not in the store's template"):
        chunk_index(store, config, outsider)
    holds = f"chunk 1 of the store holds parent cell {parents[1]}"
    with pytest.raises(TemplateMismatchError, match=holds):
        check_template(store, config, int(parents[0]), 1)
    with pytest.raises(TemplateMismatchError, match="outside"):
        check_template(store, config, int(parents[0]), parents.size)
    with pytest.raises(TemplateMismatchError, match="config"):
        check_template(store, config.with_orders(5, 12), int(parents[0]), 0)


def test_checks_without_a_template(local, config, parents):
    _, store = local
    with pytest.raises(TemplateMismatchError, match="no finished template"):
        chunk_index(store, config, int(parents[0]))
    with pytest.raises(TemplateMismatchError, match="no finished template"):
        check_template(store, config, int(parents[0]), 0)


# --- write_cell ---------------------------------------------------------------


def test_write_cell_validates_before_writing(templated, config):
    path, store = templated
    good = stats_for(config, 0)
    before = local_files(path)
    bad_calls = [
        ({**good, "h_min": good["h_min"][:-1]}, 0, "shape"),
        ({**good, "h_min": good["h_min"].astype(np.float64)}, 0, "dtype float32"),
        ({**good, "count": good["count"].astype(np.int64)}, 0, "dtype int32"),
        ({**good, "h_mode": good["h_min"]}, 0, r"unknown \['h_mode'\]"),
        ({k: v for k, v in good.items() if k != "h_q50"}, 0, r"missing \['h_q50'\]"),
        ({**good, "h_max": list(good["h_max"])}, 0, "h_max"),
        (good, 7, "outside"),
        (good, -1, "outside"),
    ]
    for stats, idx, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            write_cell(store, config, idx, stats, objects={"levels/12/1.npz": b"staged"})
    assert local_files(path) == before  # the cell's other objects neither


def test_write_cell_puts_and_removes_the_cells_other_objects_with_its_chunks(templated, config):
    """The staging object of the levels travels with the chunks (one round of requests)."""
    path, store = templated
    stats = stats_for(config, 2)
    before = local_files(path)
    write_cell(store, config, 2, stats, objects={"levels/12/5.npz": b"staged", "other": b"x"})
    after = local_files(path)
    changed = {k for k in after if after[k] != before.get(k)}
    chunks = {f"12/{s.name}/c/2" for s in config.aggregation.statistics}
    assert changed == chunks | {"levels/12/5.npz", "other"}
    assert (path / "levels" / "12" / "5.npz").read_bytes() == b"staged"

    write_cell(store, config, 2, stats, objects={"levels/12/5.npz": None})  # a cell with no data
    assert not (path / "levels" / "12" / "5.npz").exists()
    assert (path / "other").read_bytes() == b"x"


def test_write_cell_touches_only_its_chunk_and_is_idempotent(templated, config, parents):
    path, store = templated
    before = local_files(path)
    stats = stats_for(config, 3, coverage=1.0)  # no fill values at the chunk's edges
    write_cell(store, config, 3, stats)
    after = local_files(path)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {f"12/{s.name}/c/3" for s in config.aggregation.statistics}

    write_cell(store, config, 3, stats)  # a re-run: same bytes
    again = local_files(path)
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in after.items()}

    # A re-run that found no data owns its chunk too: the old values are gone.
    empty = {
        s.name: np.full(config.output.children_per_parent, s.fill_value, s.dtype)
        for s in config.aggregation.statistics
    }
    write_cell(store, config, 3, empty)
    group = zarr.open_group(store, path="12", mode="r")
    assert np.all(np.isnan(group["h_mean"][3 * 4096 : 4 * 4096]))
    assert np.all(group["count"][3 * 4096 : 4 * 4096] == 0)


def test_write_cell_puts_the_bytes_zarr_writes_and_returns_their_digests(
    templated, config, tmp_path
):
    """write_cell encodes chunks with the arrays' codecs itself: the same bytes as zarr's own
    write of the same values (checked on every statistic, a chunk with fill values, one
    without, and one all fill that both remove), and the digests are of those bytes."""
    import hashlib

    path, store = templated
    twin = LocalStore(tmp_path / "twin.zarr")
    for name, document in local_files(path).items():  # the same template, written by zarr
        if name.endswith("zarr.json"):
            (tmp_path / "twin.zarr" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "twin.zarr" / name).write_bytes(document[0])
    empty = {
        s.name: np.full(config.output.children_per_parent, s.fill_value, s.dtype)
        for s in config.aggregation.statistics
    }
    cases = {0: stats_for(config, 7), 1: stats_for(config, 8, coverage=1.0), 2: empty}
    per_parent = config.output.children_per_parent
    for idx, stats in cases.items():
        digests = write_cell(store, config, idx, stats)
        group = zarr.open_group(twin, path="12", mode="r+")
        for name, values in stats.items():
            group[name][idx * per_parent : (idx + 1) * per_parent] = values
        for name in stats:
            key = f"12/{name}/c/{idx}"
            mine, zarrs = path / key, tmp_path / "twin.zarr" / key
            assert mine.exists() == zarrs.exists() == (idx != 2), key
            if idx != 2:
                assert mine.read_bytes() == zarrs.read_bytes(), key
                assert digests[key] == hashlib.sha256(mine.read_bytes()).hexdigest()
            else:
                assert digests[key] is None


def test_write_cell_reads_the_arrays_metadata_once_per_template(templated, config, tmp_path):
    """Given the template it checked, a cell's write is one round of requests: the arrays'
    metadata is read under a template once; a re-created store (a new template id) is read
    afresh, and its chunks land as its own metadata says."""
    from zarr.storage import LoggingStore

    path, store = templated
    gets = []

    class Counting(LoggingStore):
        async def get(self, key, *args, **kwargs):
            gets.append(key)
            return await super().get(key, *args, **kwargs)

    counted = Counting(store)
    template = check_template(counted, config, int(read_template(store, config).parents[0]), 0)
    gets.clear()
    write_cell(counted, config, 0, stats_for(config, 1), template=template)
    assert sorted(gets) == sorted(f"12/{s.name}/zarr.json" for s in config.aggregation.statistics)
    gets.clear()
    write_cell(counted, config, 1, stats_for(config, 2), template=template)
    assert gets == []
    write_cell(counted, config, 1, stats_for(config, 2))  # no template: read again
    assert len(gets) == len(config.aggregation.statistics)

    other = LocalStore(tmp_path / "other.zarr")
    create_template(other, config, read_template(store, config).parents[:2], {})
    fresh = read_template(other, config)
    assert fresh.id != template.id
    write_cell(other, config, 1, stats_for(config, 3), template=fresh)
    got = zarr.open_group(other, path="12", mode="r")["h_mean"][4096:8192]
    np.testing.assert_array_equal(got, stats_for(config, 3)["h_mean"])


def test_cells_write_concurrently_from_threads(templated, config, parents):
    _, store = templated
    written = {i: stats_for(config, 100 + i) for i in range(parents.size)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: write_cell(store, config, i, written[i]), written))
    group = zarr.open_group(store, path="12", mode="r")
    h_mean = group["h_mean"][:]
    for i, stats in written.items():
        np.testing.assert_array_equal(h_mean[i * 4096 : (i + 1) * 4096], stats["h_mean"])


# --- S3 -----------------------------------------------------------------------


def test_s3_store_matches_local_byte_for_byte(s3_env, tmp_path, config, parents):
    bucket = s3_env.create_bucket(f"magg-{uuid.uuid4().hex[:12]}")
    local_path = tmp_path / "out.zarr"
    stores = {
        "local": open_store(str(local_path)),
        "s3": open_store(f"s3://{bucket}/runs/out.zarr"),  # ambient identity from the env
    }
    for store in stores.values():
        create_template(store, config, parents, {"catalog": {"cycle": 7}})
        for idx in (0, 5):
            write_cell(store, config, idx, stats_for(config, idx))
        consolidate(store)

    files = {k: v[0] for k, v in local_files(local_path).items()}
    objects = {k: v[0] for k, v in s3_objects(s3_env, bucket, "runs/out.zarr/").items()}
    assert set(objects) == set(files)
    assert {f"12/h_mean/c/{i}" for i in (0, 5)} <= set(files)
    for key in ("zarr.json", "12/zarr.json"):  # group documents differ only in creation time
        assert without_creation_stamp(objects.pop(key)) == without_creation_stamp(files.pop(key))
    assert objects == files  # every array document and chunk, byte for byte

    reread = open_store(
        f"s3://{bucket}/runs/out.zarr",
        credentials=s3_env.credentials,
        endpoint=s3_env.endpoint,
        read_only=True,
    )
    local_ds = xr.open_zarr(stores["local"], group="12", consolidated=True).load()
    s3_ds = xr.open_zarr(reread, group="12", consolidated=True).load()
    xr.testing.assert_identical(local_ds.drop_attrs(), s3_ds.drop_attrs())


def test_s3_mismatch_leaves_objects_unchanged(s3_env, config, parents):
    bucket = s3_env.create_bucket(f"magg-{uuid.uuid4().hex[:12]}")
    store = open_store(f"s3://{bucket}/out.zarr")
    create_template(store, config, parents, {})
    before = s3_objects(s3_env, bucket, "out.zarr/")
    create_template(store, config, parents, {})
    with pytest.raises(TemplateMismatchError):
        create_template(store, config, parents[1:], {})
    with pytest.raises(ValueError):
        write_cell(store, config, 0, {**stats_for(config, 0), "h_min": np.zeros(3, np.float32)})
    assert s3_objects(s3_env, bucket, "out.zarr/") == before


# --- records ------------------------------------------------------------------


def record_for(parent: int, status: str = "ok") -> CellRecord:
    result = CellResult(
        parent_morton=parent,
        status=status,
        cells_with_data=12,
        total_obs=3456,
        granule_count=3,
        files_processed=2,
        files_failed=[GranuleFailure(url="s3://b/ATL06_x.h5", reason="truncated")],
        duration_s=Timings(read=1.5, aggregate=0.25, write=0.125, total=2.0),
        peak_rss_mb=321.5,
    )
    fingerprint = input_fingerprint([f"s3://b/{parent}.h5"], "cafe", "0.1.0")
    return CellRecord(result=result, fingerprint=fingerprint, written_at="2026-01-02T03:04:05Z")


def test_records_round_trip_beside_the_arrays(templated, config, parents):
    path, store = templated
    records = {int(p): record_for(int(p)) for p in parents[:3]}
    for record in records.values():
        write_record(store, config, record)
    write_cell(store, config, 0, stats_for(config, 0))
    assert read_records(store, config) == records
    assert max(records) > 2**63  # uint64 words survive JSON

    replaced = record_for(int(parents[0]), status="empty")
    write_record(store, config, replaced)
    assert read_records(store, config)[int(parents[0])] == replaced
    assert read_records(store, config.with_orders(6, 11)) == {}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # records must not make zarr or xarray complain
        consolidate(store)
        for consolidated in (True, False):
            ds = xr.open_zarr(store, group="12", consolidated=consolidated)
            assert set(ds.variables) == {"cell_ids", "morton"} | {
                s.name for s in config.aggregation.statistics
            }
    assert (path / "records" / "12" / f"{parents[0]}.json").is_file()


def test_records_on_s3(s3_env, config, parents):
    bucket = s3_env.create_bucket(f"magg-{uuid.uuid4().hex[:12]}")
    store = open_store(f"s3://{bucket}/out.zarr")
    records = {int(p): record_for(int(p)) for p in parents}
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda r: write_record(store, config, r), records.values()))
    assert read_records(store, config) == records


def test_input_fingerprint_is_a_function_of_the_granule_set():
    urls = ["s3://b/a.h5", "s3://b/b.h5", "s3://b/c.h5"]
    base = input_fingerprint(urls, "abc", "0.1.0")
    assert input_fingerprint(reversed(urls), "abc", "0.1.0") == base
    assert input_fingerprint(urls + urls[:1], "abc", "0.1.0") == base
    assert input_fingerprint(urls[:2], "abc", "0.1.0") != base
    assert input_fingerprint(urls, "abd", "0.1.0") != base
    assert input_fingerprint(urls, "abc", "0.1.1") != base
    mirrored = ["/data/mirror/a.h5", "file:///m/b.h5", "s3://copies/x/c.h5"]
    assert input_fingerprint(mirrored, "abc", "0.1.0") == base  # the same files, elsewhere
