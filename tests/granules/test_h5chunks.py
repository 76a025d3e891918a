"""The two chunk decoders (h5coro-hidefix, zlib + numpy) give h5py's bytes, and damage by name.

Every 1-D numeric dataset of every sample layout (release 006 and 007, as
written and repacked, big-endian with shuffle, chunk indexes HDF5 walks) and
of the real NSIDC granules in /work/shared/realdata/atl06 is read whole and in
row spans by both decoders and compared with h5py byte for byte. A corrupt
chunk is refused by both with the dataset's name, and by ``read_granule``
with the granule's too, never with hidefix's Rust backtrace or the file's bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from magg_core.access.s3 import S3Endpoint
from magg_core.config import load_config
from magg_core.granules import h5chunks
from magg_core.granules.h5chunks import CorruptFileError, index_column, read_spans
from magg_core.granules.h5driver import S3Access, open_h5
from magg_core.granules.read import GranuleReadError, read_granule
from magg_core.granules.sample import BEAMS, write_sample
from tests import oracle

REAL = sorted(Path("/work/shared/realdata/atl06").glob("*.h5"))
LAYOUTS = {
    "r006": {"layout": "r006"},
    "r007": {"layout": "r007"},
    "r007-10k": {"layout": "r007", "chunk_rows": 10_000},
}
"""As tests/granules/test_read_layouts.py writes them; its repacked variants, which need
h5repack, are read there by the default decoder (hidefix) against the oracle."""
CANARY = b"MAGG-CANARY-q7Zx!"
SEGMENTS = "gt1l/land_ice_segments"
CONFIG = load_config("atl06")
ACCESS = S3Access(credentials=None, endpoint=S3Endpoint())


def test_hidefix_is_installed_here():
    """Otherwise every comparison below would compare the fallback with itself."""
    assert h5chunks.HidefixIndex is not None


@pytest.fixture(scope="module")
def granules(tmp_path_factory) -> dict[str, Path]:
    """One granule per layout, plus the layouts HDF5 walks or stores big-endian."""
    root = tmp_path_factory.mktemp("decoders")
    out = {
        name: write_sample(root / name, n_granules=1, seed=5, extent_km=150.0, **options)[0].path
        for name, options in LAYOUTS.items()
    }
    source = out["r006"]
    for name, libver, options in [
        ("big-endian-shuffled", "earliest", {"big_endian": True, "shuffle": True}),
        ("fixed-array", "latest", {"shuffle": True}),
        ("extensible-array", "v110", {"maxshape": (None,)}),
        ("unfiltered", "earliest", {"compression": None}),
    ]:
        out[name] = rewritten(source, root / f"{name}.h5", libver=libver, **options)
    for path in REAL:
        out[path.name] = path
    return out


def rewritten(source: Path, target: Path, *, libver: str, **options) -> Path:
    """Every beam dataset of ``source`` written anew, gzip'd unless told, with ``options``."""
    big_endian = options.pop("big_endian", False)
    options.setdefault("compression", "gzip")
    with h5py.File(source, "r") as src, h5py.File(target, "w", libver=libver) as dst:
        for beam in (b for b in BEAMS if b in src):
            for name, dset in src[f"{beam}/land_ice_segments"].items():
                data = dset[:]
                if big_endian:
                    data = data.astype(data.dtype.newbyteorder(">"))
                dst.create_dataset(
                    f"{beam}/land_ice_segments/{name}",
                    data=data,
                    chunks=(3_000,),
                    fillvalue=dset.fillvalue,
                    **options,
                )
    return target


def numeric_datasets(path: Path) -> list[str]:
    """Every 1-D integer or float dataset with rows in the file."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim == 1 and obj.dtype.kind in "iuf":
            if obj.shape[0] > 0:
                found.append(name)

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


def assert_same_bytes(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.dtype == expected.dtype.newbyteorder("="), what
    assert got.dtype.isnative, what
    assert got.tobytes() == expected.astype(got.dtype).tobytes(), what


@pytest.mark.parametrize(
    "name",
    [*LAYOUTS, "big-endian-shuffled", "fixed-array", "extensible-array", "unfiltered"]
    + [p.name for p in REAL],
)
def test_both_decoders_read_every_dataset_as_h5py_does(granules, name):
    path = granules[name]
    datasets = numeric_datasets(path)
    assert len(datasets) >= 5, datasets
    rng = np.random.default_rng(7)
    h5 = open_h5(str(path), ACCESS)
    with h5, h5py.File(path, "r") as f:
        for dataset in datasets:
            column = index_column(h5, dataset)
            expected = f[dataset][:]
            n = expected.size
            cuts = np.sort(rng.integers(0, n + 1, size=4))
            spans = [(0, n), (int(cuts[0]), int(cuts[1])), (int(cuts[2]), int(cuts[3]))]
            compiled = read_spans(h5, column, spans, hidefix=True)
            fallback = read_spans(h5, column, spans, hidefix=False)
            for (a, b), one, other in zip(spans, compiled, fallback, strict=True):
                assert_same_bytes(one, expected[a:b], f"{name} {dataset} [{a}, {b}) hidefix")
                assert_same_bytes(other, expected[a:b], f"{name} {dataset} [{a}, {b}) zlib")


def test_a_dataset_with_unallocated_chunks_is_decoded_by_the_fallback(tmp_path):
    """hidefix needs every chunk listed; rows in no chunk are the fill value either way."""
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("x", shape=(9_000,), dtype="f8", chunks=(1_000,), fillvalue=-7.5)
        dset.attrs["a"] = 1
        f.create_dataset("y", data=np.arange(9_000.0), chunks=(1_000,), compression="gzip")
        dset[2_500:3_200] = np.arange(700.0)
    h5 = open_h5(str(path), ACCESS)
    with h5, h5py.File(path, "r") as f:
        column = index_column(h5, "x")
        assert len(column.chunks) == 2
        for hidefix in (True, False):
            (got,) = read_spans(h5, column, [(0, 9_000)], hidefix=hidefix)
            assert_same_bytes(got, f["x"][:], f"hidefix={hidefix}")


# --- requests -------------------------------------------------------------------------


def three_variables(path: Path, between: int) -> dict[str, list]:
    """A file with datasets ``a``, ``b``, ``c`` (gzip'd, 4 chunks each), written in that
    order, with an unrelated dataset of ``between`` bytes written between ``b`` and ``c``;
    h5py's own account of where each dataset's chunks lie."""
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:

        def variable(name: str) -> None:
            f.create_dataset(
                name, data=rng.normal(size=40_000), chunks=(10_000,), compression="gzip"
            )

        variable("a")
        variable("b")
        if between:
            f.create_dataset("filler", data=rng.integers(0, 255, between, dtype="u1"))
        variable("c")
    with h5py.File(path, "r") as f:
        return {n: [f[n].id.get_chunk_info(i) for i in range(4)] for n in "abc"}


@pytest.mark.parametrize("hidefix", [True, False])
def test_variables_lying_together_in_the_file_are_fetched_in_one_request(tmp_path, hidefix):
    """Chunks of several datasets with only HDF5's small structures between them (a
    B-tree node, an object header) cost one request, fetching less than 1/16 beyond them."""
    path = tmp_path / "together.h5"
    chunks = three_variables(path, between=0)
    stored = sum(c.size for infos in chunks.values() for c in infos)
    h5 = open_h5(str(path), ACCESS)
    with h5, h5py.File(path, "r") as f:
        columns = [index_column(h5, name) for name in "abc"]
        requests, fetched = h5.driver.requests, h5.driver.bytes_fetched
        spans = [(0, 40_000), (5_000, 25_000)]
        got = h5chunks.read_columns(h5, [(c, spans) for c in columns], hidefix=hidefix)
        assert h5.driver.requests - requests == 1
        assert stored <= h5.driver.bytes_fetched - fetched <= stored * (1 + 1 / 16)
        for name, values in zip("abc", got, strict=True):
            for (a, b), part in zip(spans, values, strict=True):
                assert_same_bytes(part, f[name][a:b], f"{name} [{a}, {b})")


def test_variables_far_apart_in_the_file_are_not_fetched_with_what_lies_between(tmp_path):
    """A gap larger than 1/16 of the chunks around it is skipped: two requests, and the
    bytes fetched are the chunks' own plus the small gaps only."""
    path = tmp_path / "apart.h5"
    between = 400_000
    chunks = three_variables(path, between=between)
    stored = sum(c.size for infos in chunks.values() for c in infos)
    assert chunks["c"][0].byte_offset - (chunks["b"][-1].byte_offset + chunks["b"][-1].size) > (
        between
    )
    h5 = open_h5(str(path), ACCESS)
    with h5, h5py.File(path, "r") as f:
        columns = [index_column(h5, name) for name in "abc"]
        requests, fetched = h5.driver.requests, h5.driver.bytes_fetched
        got = h5chunks.read_columns(h5, [(c, [(0, 40_000)]) for c in columns])
        assert h5.driver.requests - requests == 2
        assert stored <= h5.driver.bytes_fetched - fetched <= stored * (1 + 1 / 16)
        for name, (values,) in zip("abc", got, strict=True):
            assert_same_bytes(values, f[name][:], name)


def test_one_variables_chunks_not_wanted_are_not_fetched(tmp_path):
    """Rows in the first and last chunk only: the two chunks between, a quarter of the
    dataset each, are far above 1/16 of what is wanted and stay unread."""
    path = tmp_path / "ends.h5"
    chunks = three_variables(path, between=0)["a"]
    h5 = open_h5(str(path), ACCESS)
    with h5, h5py.File(path, "r") as f:
        column = index_column(h5, "a")
        requests, fetched = h5.driver.requests, h5.driver.bytes_fetched
        spans = [(0, 10), (39_990, 40_000)]
        got = read_spans(h5, column, spans)
        assert h5.driver.requests - requests == 2
        assert h5.driver.bytes_fetched - fetched == chunks[0].size + chunks[-1].size
        for (a, b), part in zip(spans, got, strict=True):
            assert_same_bytes(part, f["a"][a:b], f"[{a}, {b})")


# --- damage --------------------------------------------------------------------------


def chunk_of(path: Path, dataset: str) -> h5py.h5d.StoreInfo:
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_chunk_info(0)


def damaged(source: Path, directory: Path, dataset: str, how: str) -> Path:
    """A copy of ``source`` with the first chunk of ``dataset`` damaged ``how``."""
    path = directory / f"{how}-{source.name}"
    shutil.copy(source, path)
    chunk = chunk_of(source, dataset)
    with path.open("r+b") as f:
        if how == "canary":  # bytes overwritten mid-stream
            f.seek(chunk.byte_offset + chunk.size // 2)
            f.write(CANARY)
        elif how == "checksum":  # the last byte of the zlib stream's Adler-32
            f.seek(chunk.byte_offset + chunk.size - 1)
            last = f.read(1)[0]
            f.seek(chunk.byte_offset + chunk.size - 1)
            f.write(bytes([last ^ 0x01]))
    return path


@pytest.mark.parametrize("how", ["canary", "checksum"])
@pytest.mark.parametrize("hidefix", [True, False])
def test_a_corrupt_chunk_is_refused_by_both_decoders_naming_the_dataset(
    granules, tmp_path, how, hidefix
):
    dataset = f"{SEGMENTS}/h_li"
    path = damaged(granules["r006"], tmp_path, dataset, how)
    h5 = open_h5(str(path), ACCESS)
    with h5:
        column = index_column(h5, dataset)
        with pytest.raises(CorruptFileError) as caught:
            read_spans(h5, column, [(0, column.n_rows)], hidefix=hidefix)
    assert str(caught.value) == f"{dataset}: a compressed chunk does not inflate"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_an_unfiltered_chunk_of_the_wrong_size_is_corrupt_not_a_rust_panic(granules, tmp_path):
    """An instance the issue did not name: hidefix panics on it, so its size is checked first."""
    source = granules["unfiltered"]
    h5 = open_h5(str(source), ACCESS)
    with h5:
        column = index_column(h5, f"{SEGMENTS}/h_li")
    first = column.chunks[0]
    short = h5chunks.Column(
        **{**column.__dict__, "chunks": (h5chunks.Chunk(0, first.address, first.size - 8),)}
        | {"n_rows": min(column.n_rows, column.chunk_rows)}
    )
    h5 = open_h5(str(source), ACCESS)
    with h5:
        for hidefix in (True, False):
            with pytest.raises(CorruptFileError, match=f"^{SEGMENTS}/h_li: "):
                read_spans(h5, short, [(0, short.n_rows)], hidefix=hidefix)


def test_read_granule_names_the_granule_and_the_dataset_and_nothing_of_the_file(
    granules, tmp_path, caplog
):
    source = granules["r006"]
    path = damaged(source, tmp_path, f"{SEGMENTS}/h_li", "canary")
    points = oracle.good_points([source])
    cells = points[points["beam"] == "gt1l"]["cell"].to_numpy() >> 12
    parent = oracle.parent_morton(int(np.bincount(cells).argmax()), 6)
    with caplog.at_level("DEBUG"), pytest.raises(GranuleReadError) as caught:
        read_granule(str(path), parent, CONFIG)
    error = caught.value
    assert error.url == str(path) and str(path) in str(error)
    assert error.reason == (
        f"cannot read variables: corrupt HDF5 ({SEGMENTS}/h_li: "
        "a compressed chunk does not inflate)"
    )
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (str(error), repr(error), logged):
        for leak in ("backtrace", "hidefix", "anyhow", "panicked", CANARY.decode()[:6]):
            assert leak not in text, (leak, text[:300])
