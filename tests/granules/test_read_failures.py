"""Granules h5coro cannot read: read another way, or refused by name, never quoting the file.

- Files written with ``libver="v110"``/``"latest"`` (superblock 3, the new
  chunk indexes) and big-endian values are read, equal to the h5py oracle.
- Structures nothing here decodes (superblock and layout versions, filters,
  2-D datasets; the new chunk indexes where h5py is absent) are
  "unsupported format (<structure>)", not "corrupt".
- Damaged files (not HDF5, a corrupt deflate chunk, a damaged B-tree node,
  object header or symbol table, a truncated file) are reported without any
  byte of the file in the reason, the exception text or the logs.
- A cell gridded with such granules among good ones has every point of the
  good ones.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from h5coro.filedriver import FileDriver
from h5coro.h5coro import H5Coro
from h5coro.h5dataset import H5Dataset

from magg.tasks.cells import CELL_RETRIES
from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import load_config
from magg_core.errors import is_transient
from magg_core.granules.read import GranuleReadError, read_granule
from magg_core.granules.sample import BEAMS, write_sample
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import plan_cells
from magg_core.store.arrays import create_template, open_store
from tests import oracle
from tests.conftest import running_moto

CONFIG = load_config("atl06")
BUCKET = "magg-failure-tests"
CANARY = b"MAGG-CANARY-q7Zx!"
"""Written into damaged files: no reason, exception text or log line may show it."""
SEGMENTS = "gt1l/land_ice_segments"
PARSER_FAILED = f"cannot read coordinates: corrupt HDF5 ({SEGMENTS}/latitude: neither h5coro ("
"""h5coro tripped, and HDF5 reading the same bytes fails too: damage, not a structure."""


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("granules"), n_granules=4, seed=3, extent_km=200)


@pytest.fixture(scope="module")
def moto_server():
    """This module's own moto server: a read of the session's server hung here in CI after
    the modules before it (not reproduced alone), so these reads do not depend on its state."""
    with running_moto() as server:
        yield server


@pytest.fixture(scope="module")
def bucket(moto_server):
    moto_server.create_bucket(BUCKET)
    return moto_server


@pytest.fixture(scope="module")
def parent(sample):
    """The parent where granule 0's gt1l has the most good points."""
    points = oracle.good_points([sample[0].path])
    cells = points[points["beam"] == "gt1l"]["cell"].to_numpy() >> 12
    return oracle.parent_morton(int(np.bincount(cells).argmax()), 6)


def copy_of(granule, directory: Path, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or granule.name)
    shutil.copy(granule.path, path)
    return path


def rewritten(source: Path, target: Path, *, libver, **options) -> Path:
    """``source`` written anew with ``libver`` bounds; every beam dataset with ``options``.

    ``options["chunks"] == "whole"`` makes one chunk of the whole dataset;
    ``options["two_d"]`` stores each dataset as an ``(n, 1)`` array.
    """
    whole = options.pop("chunks", None) == "whole"
    two_d = options.pop("two_d", False)
    with h5py.File(source, "r") as src, h5py.File(target, "w", libver=libver) as dst:
        for beam in (b for b in BEAMS if b in src):
            group = dst.create_group(f"{beam}/land_ice_segments")
            for name, dset in src[f"{beam}/land_ice_segments"].items():
                data = dset[:].reshape(-1, 1) if two_d else dset[:]
                chunks = data.shape if whole else options.get("chunks")
                extra = {k: v for k, v in options.items() if k != "chunks"}
                group.create_dataset(name, data=data, chunks=chunks, **extra)
    return target


def fails(url: str, parent: int, moto=None) -> GranuleReadError:
    """The granule's own failure, as a run reports it: a read whose cause is transient (a
    connection to moto dropped under load) is tried again, as the task's retries do."""
    for _ in range(CELL_RETRIES + 1):
        with pytest.raises(GranuleReadError) as caught:
            read_granule(
                url,
                parent,
                CONFIG,
                credentials=moto.credentials if moto else None,
                endpoint=moto.endpoint if moto else None,
            )
        cause = caught.value.__cause__
        if cause is None or not is_transient(cause):
            break
    assert caught.value.url == url
    return caught.value


# --- unsupported structures, refused by name ----------------------------------------

CHUNK_INDEXES = {
    "extensible array": ("v110", {"chunks": (10_000,), "maxshape": (None,), "compression": "gzip"}),
    "fixed array": ("latest", {"chunks": (10_000,), "compression": "gzip", "shuffle": True}),
    "single chunk": ("latest", {"chunks": "whole", "compression": "gzip"}),
    "version 2 B-tree": (
        "latest",
        {"chunks": (10_000, 1), "maxshape": (None, None), "two_d": True},
    ),
}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("structure", ["extensible array", "fixed array", "single chunk"])
def test_new_chunk_indexes_are_walked_by_hdf5_and_read(
    sample, parent, bucket, tmp_path, structure, where
):
    libver, options = CHUNK_INDEXES[structure]
    path = rewritten(sample[0].path, tmp_path / sample[0].name, libver=libver, **options)
    assert path.read_bytes()[8] == 3, "these indexes come with superblock version 3"
    [url] = bucket.upload_dir(tmp_path, BUCKET, f"index-{where}") if where == "s3" else [str(path)]
    points = oracle.points_in_parent(oracle.good_points([path]), parent)
    got = read_granule(
        url, parent, CONFIG, credentials=bucket.credentials, endpoint=bucket.endpoint
    )
    assert len(got) == len(points) > 0
    for name in ("h_li", "h_li_sigma"):
        np.testing.assert_array_equal(np.sort(got.columns[name]), np.sort(points[name]))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_truncated_v110_file_is_reported_as_truncated(sample, parent, bucket, tmp_path, where):
    """Cut where h5coro still parses the groups and HDF5 itself finds the end missing."""
    libver, options = CHUNK_INDEXES["fixed array"]
    whole = rewritten(sample[0].path, tmp_path / "whole.h5", libver=libver, **options)
    cut = tmp_path / "cut" / sample[0].name
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 19 // 20])
    [url] = bucket.upload_dir(cut.parent, BUCKET, f"cut-{where}") if where == "s3" else [str(cut)]
    error = fails(url, parent, bucket)
    assert error.reason == (
        "cannot read coordinates: corrupt HDF5 "
        f"({SEGMENTS}/latitude: HDF5 cannot read the file (truncated or damaged))"
    )


def test_a_version_2_b_tree_dataset_is_two_dimensional_and_refused(sample, parent, tmp_path):
    """HDF5 uses a version-2 B-tree only for several unlimited dimensions: never 1-D."""
    libver, options = CHUNK_INDEXES["version 2 B-tree"]
    path = rewritten(sample[0].path, tmp_path / sample[0].name, libver=libver, **options)
    error = fails(str(path), parent)
    assert error.reason == (
        "cannot read coordinates: unsupported format "
        f"({SEGMENTS}/latitude: only 1-D integer or float datasets are read)"
    )


@pytest.mark.parametrize("structure", CHUNK_INDEXES)
def test_without_h5py_new_chunk_indexes_are_refused_by_type(
    sample, parent, tmp_path, monkeypatch, structure
):
    """As in the Lambda layer, which leaves h5py out."""
    libver, options = CHUNK_INDEXES[structure]
    path = rewritten(sample[0].path, tmp_path / sample[0].name, libver=libver, **options)
    monkeypatch.setitem(sys.modules, "h5py", None)  # ``import h5py`` now raises ImportError
    error = fails(str(path), parent)
    assert error.reason == (
        "cannot read coordinates: unsupported format "
        f"({SEGMENTS}/latitude: chunk index type: {structure})"
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_superblock_3_itself_is_read(sample, parent, bucket, tmp_path, where):
    """libver="latest" without chunking: superblock 3, object header v2, contiguous data."""
    path = rewritten(sample[0].path, tmp_path / sample[0].name, libver="latest")
    assert path.read_bytes()[8] == 3
    [url] = bucket.upload_dir(tmp_path, BUCKET, "sb3") if where == "s3" else [str(path)]
    points = oracle.points_in_parent(oracle.good_points([path]), parent)
    got = read_granule(
        url, parent, CONFIG, credentials=bucket.credentials, endpoint=bucket.endpoint
    )
    assert len(got) == len(points) > 0
    np.testing.assert_array_equal(np.sort(got.columns["h_li"]), np.sort(points["h_li"]))


@pytest.mark.parametrize("version", [1, 4])
def test_other_superblock_versions_are_an_unsupported_format(sample, parent, tmp_path, version):
    path = copy_of(sample[0], tmp_path)
    with path.open("r+b") as f:
        f.seek(8)
        f.write(bytes([version]))
    error = fails(str(path), parent)
    assert error.reason == f"cannot open: unsupported format (superblock version {version})"


DATATYPE_MESSAGE, LAYOUT_MESSAGE = 0x0003, 0x0008


def message_offset(path: Path, dataset: str, kind: int) -> int:
    """File offset of the body of message ``kind`` in ``dataset``'s version-1 object header.

    Walked here from the HDF5 specification (16-byte header prefix, then
    messages of type (2 bytes), size (2), flags (1), reserved (3), body),
    independently of h5coro and magg.
    """
    with h5py.File(path, "r") as f:
        address = h5py.h5o.get_info(f[dataset].id).addr
    raw = path.read_bytes()
    assert raw[address] == 1, "a version-1 object header"
    count = int.from_bytes(raw[address + 2 : address + 4], "little")
    at = address + 16
    for _ in range(count):
        size = int.from_bytes(raw[at + 2 : at + 4], "little")
        if int.from_bytes(raw[at : at + 2], "little") == kind:
            return at + 8
        at += 8 + size
    raise AssertionError(f"no message {kind} in the first header block")


def test_old_data_layout_versions_are_an_unsupported_format(sample, parent, tmp_path):
    path = copy_of(sample[0], tmp_path)
    at = message_offset(path, f"{SEGMENTS}/h_li_sigma", LAYOUT_MESSAGE)
    assert path.read_bytes()[at] == 3
    overwrite(path, at, bytes([2]))  # HDF5 1.4/1.6's layout message
    error = fails(str(path), parent)
    assert error.reason == (
        f"cannot read variables: unsupported format ({SEGMENTS}/h_li_sigma: data layout version 2)"
    )


def test_vax_float_byte_order_is_an_unsupported_format(sample, parent, tmp_path):
    path = copy_of(sample[0], tmp_path)
    at = message_offset(path, f"{SEGMENTS}/h_li", DATATYPE_MESSAGE)
    head = path.read_bytes()[at : at + 2]
    assert head[0] & 0x0F == 1 and head[1] & 0x41 == 0, "a little-endian float"
    overwrite(path, at + 1, bytes([head[1] | 0x41]))  # byte-order bits 0 and 6: VAX order
    error = fails(str(path), parent)
    assert error.reason == (
        "cannot read variables: unsupported format "
        f"({SEGMENTS}/h_li: VAX floating-point byte order)"
    )


def test_big_endian_values_are_read_in_native_order(sample, parent, tmp_path):
    path = tmp_path / sample[0].name
    with h5py.File(sample[0].path, "r") as src, h5py.File(path, "w") as dst:
        for beam in (b for b in BEAMS if b in src):
            for name, dset in src[f"{beam}/land_ice_segments"].items():
                dst.create_dataset(
                    f"{beam}/land_ice_segments/{name}",
                    data=dset[:].astype(dset.dtype.newbyteorder(">")),
                    chunks=dset.chunks,
                    compression="gzip",
                    shuffle=True,
                    fillvalue=dset.fillvalue,
                )
        assert dst[f"{SEGMENTS}/h_li"].dtype.byteorder == ">"
    points = oracle.points_in_parent(oracle.good_points([path]), parent)
    got = read_granule(str(path), parent, CONFIG)
    assert got.columns["h_li"].dtype == np.float32 and got.columns["h_li"].dtype.isnative
    assert len(got) == len(points) > 0
    np.testing.assert_array_equal(np.sort(got.columns["h_li"]), np.sort(points["h_li"]))


def test_a_filter_h5coro_lacks_is_an_unsupported_format(sample, parent, tmp_path):
    path = copy_of(sample[0], tmp_path)
    with h5py.File(path, "a") as f:
        data, chunks = f[f"{SEGMENTS}/h_li"][:], f[f"{SEGMENTS}/h_li"].chunks
        del f[f"{SEGMENTS}/h_li"]
        f.create_dataset(f"{SEGMENTS}/h_li", data=data, chunks=chunks, fletcher32=True)
    error = fails(str(path), parent)
    assert error.reason.startswith("cannot read variables: unsupported format (")
    assert f"{SEGMENTS}/h_li" in error.reason and "filter" in error.reason


# --- damaged files: reasons in our words only ---------------------------------------


def btree_address(path: Path, dataset: str) -> int:
    """Where h5coro (not magg) finds the chunk B-tree of ``dataset``."""
    h5 = H5Coro(str(path), FileDriver)
    return H5Dataset(
        h5, dataset, earlyExit=True, metaOnly=True, enableAttributes=False
    ).meta.address


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def damaged_copies(granule, directory: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of damage, the canary written into it, and the words its reason must start with."""
    cases = {}
    path = directory / "not_hdf5.h5"
    path.write_bytes(CANARY * 4096)
    cases["not HDF5"] = (path, "cannot open: not an HDF5 file (no HDF5 signature at the start")

    path = copy_of(granule, directory, "deflate.h5")
    with h5py.File(granule.path, "r") as f:
        chunks = [
            f[f"{beam}/land_ice_segments/h_li"].id.get_chunk_info(0) for beam in BEAMS if beam in f
        ]
    for chunk in chunks:
        overwrite(path, chunk.byte_offset + chunk.size // 2, CANARY)
    cases["corrupt deflate chunk"] = (
        path,
        "cannot read variables: corrupt HDF5 (gt",  # …/h_li: a compressed chunk does not inflate
    )

    path = copy_of(granule, directory, "btree.h5")
    overwrite(path, btree_address(granule.path, f"{SEGMENTS}/h_li"), CANARY)
    cases["garbage in a B-tree node"] = (
        path,
        f"cannot read variables: corrupt HDF5 ({SEGMENTS}/h_li: a chunk B-tree node is damaged)",
    )

    path = copy_of(granule, directory, "header.h5")
    with h5py.File(granule.path, "r") as f:
        header = h5py.h5o.get_info(f[f"{SEGMENTS}/latitude"].id).addr
    overwrite(path, header, CANARY)
    cases["garbage in an object header"] = (path, PARSER_FAILED)

    path = copy_of(granule, directory, "symbols.h5")
    raw = path.read_bytes()
    nodes = [i for i in range(len(raw)) if raw.startswith(b"SNOD", i)]
    assert nodes, "an r006 granule has symbol-table nodes"
    for node in nodes:
        overwrite(path, node, CANARY)
    cases["garbage in symbol-table nodes"] = (path, PARSER_FAILED)

    path = directory / "truncated.h5"
    path.write_bytes(granule.path.read_bytes()[: granule.path.stat().st_size * 3 // 5])
    cases["truncated"] = (path, "cannot read ")
    return cases


@pytest.fixture(scope="module")
def damaged(sample, bucket, tmp_path_factory):
    directory = tmp_path_factory.mktemp("damaged")
    cases = damaged_copies(sample[0], directory)
    bucket.upload_dir(directory, BUCKET, "damaged")
    return cases


def canary_forms() -> list[str]:
    """The canary as text and as the hex a parser would print of its first bytes."""
    head = CANARY[:8]
    return [
        CANARY.decode(),
        CANARY[:6].decode(),
        head.hex(),
        f"{int.from_bytes(head, 'little'):x}",
        f"{int.from_bytes(head[:4], 'little'):x}",
    ]


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize(
    "case",
    [
        "not HDF5",
        "corrupt deflate chunk",
        "garbage in a B-tree node",
        "garbage in an object header",
        "garbage in symbol-table nodes",
        "truncated",
    ],
)
def test_damage_is_reported_without_the_files_bytes(
    damaged, parent, moto_server, caplog, where, case
):
    path, words = damaged[case]
    url = str(path) if where == "local" else f"s3://{BUCKET}/damaged/{path.name}"
    with caplog.at_level("DEBUG"):
        error = fails(url, parent, moto_server)
    assert error.reason.startswith(words), error.reason
    if case == "truncated":
        assert "truncated" in error.reason
    assert "\n" not in error.reason
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (error.reason, str(error), repr(error), logged):
        for form in canary_forms():
            assert form not in text, (case, form, text[:300])


def test_a_parser_message_quoting_the_file_never_reaches_the_reason(tmp_path, parent):
    """The reported case: /etc/passwd read as a granule; h5coro's message quotes 8 of its bytes."""
    path = tmp_path / "passwd.h5"
    content = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin\n"
    path.write_bytes(content)
    error = fails(str(path), parent)
    assert "0x303a783a746f6f72" not in str(error) and "root:x" not in error.reason
    assert error.reason == (
        "cannot open: not an HDF5 file (no HDF5 signature at the start of the file or after "
        "a user block)"
    )


# --- a cell gridded with such granules ----------------------------------------------


def test_a_cell_with_unreadable_granules_has_every_point_of_the_others(sample, tmp_path):
    catalog = catalog_from_records([g.umm for g in sample], cycle=22)
    url = str(tmp_path / "out.zarr")
    store = open_store(url)
    create_template(store, CONFIG, catalog.parents, {"test": True})
    requests = plan_cells(catalog, CONFIG, url, granule_mirror=str(sample[0].path.parent))
    request = max(requests, key=lambda r: len(r.granule_urls))
    names = [Path(u).name for u in request.granule_urls]
    assert len(names) >= 3
    by_name = {g.name: g for g in sample}
    mixed = tmp_path / "mixed"
    # read: one granule with an empty beam, one written with libver="v110";
    # refused: one with a filter nothing here decodes, one not HDF5 at all
    empty_beam = copy_of(by_name[names[0]], mixed)
    with h5py.File(empty_beam, "a") as f:
        group = f[SEGMENTS]
        for name in list(group):
            dtype = group[name].dtype
            del group[name]
            group.create_dataset(name, shape=(0,), dtype=dtype, maxshape=(None,), chunks=(100,))
    v110 = rewritten(
        by_name[names[1]].path, mixed / names[1], libver="v110", **CHUNK_INDEXES["fixed array"][1]
    )
    unsupported = copy_of(by_name[names[0]], mixed, "ATL06_20240101000000_00012211_007_02.h5")
    with h5py.File(unsupported, "a") as f:
        for beam in (b for b in BEAMS if b in f):
            dataset = f"{beam}/land_ice_segments/h_li"
            data, chunks = f[dataset][:], f[dataset].chunks
            del f[dataset]
            f.create_dataset(dataset, data=data, chunks=chunks, fletcher32=True)
    not_hdf5 = mixed / "ATL06_20240102000000_00022211_007_01.h5"  # another acquisition
    not_hdf5.write_bytes(CANARY * 100)
    good = [str(by_name[n].path) for n in names[2:]]
    urls = (str(empty_beam), str(unsupported), str(v110), str(not_hdf5), *good)

    result = process_cell(replace(request, granule_urls=urls, accept_partial=True))

    assert result.status == "partial" and result.files_processed == len(urls) - 2
    assert [f.url for f in result.files_failed] == [str(unsupported), str(not_hdf5)]
    assert "unsupported format" in result.files_failed[0].reason
    assert "not an HDF5 file" in result.files_failed[1].reason
    assert CANARY.decode() not in repr(result)
    expected = oracle.reference_statistics([empty_beam, v110, *good])[request.parent_morton]
    n = CONFIG.output.children_per_parent
    chunk = slice(request.chunk_idx * n, (request.chunk_idx + 1) * n)
    group = zarr.open_group(store, path="12", mode="r")
    np.testing.assert_array_equal(group["count"][chunk], expected["count"])
    assert result.total_obs == int(expected["count"].sum()) > 0
    np.testing.assert_allclose(group["h_mean"][chunk], expected["h_mean"], rtol=1e-6)
