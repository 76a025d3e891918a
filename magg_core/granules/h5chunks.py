"""1-D HDF5 datasets read in few requests: index the chunks once, fetch adjacent chunks together.

h5coro reads a chunked dataset one chunk at a time -- request, wait, inflate,
next request -- so on S3 every chunk costs a round trip, one after another:
a real ATL06 beam has ~15 chunks per coordinate, and reading a granule's
coordinates took ~15 round trips in a row. Here h5coro still parses what it
parses well (superblock, groups, object headers), but the data path is ours:

1. :func:`index_column` reads the dataset's chunk B-tree (version 1, the only
   kind superblock v0/v2 files have) into a list of chunks: first row, file
   address, stored size;
2. :func:`read_columns` takes the chunks that overlap the wanted row spans
   of one or several datasets, groups those lying back to back in the file
   (HDF5 writers put a dataset's chunks one after another, and often one
   dataset after another) or nearly so into *runs*, fetches each run with
   one ranged request, and decodes with zlib and numpy.

A whole coordinate is then one request instead of fifteen, a beam's
variables often one request together, and the bytes fetched are the chunks'
stored bytes and at most :data:`MERGE_GAP_FRACTION` more.

Only what ATL06 uses is supported: 1-D integer or float datasets of either
byte order, chunked with optional shuffle + deflate (or contiguous/compact,
read as one uncompressed "chunk"). A dataset with zero rows, or never
written, has no chunks at all: its index address is HDF5's undefined address
and every row holds the fill value. Anything else raises
:class:`UnsupportedDatasetError`, naming the structure, rather than returning
wrong numbers. Damage this module detects raises :class:`CorruptFileError`.
Neither message carries bytes of the file.

Decoding: where ``h5coro-hidefix`` is installed (a compiled, numpy-only
wheel), the fetched chunks are inflated, unshuffled and assembled by it
(:func:`_decode_hidefix`): our own chunk index becomes its
``Index.from_chunks`` manifest, ``read_plan`` names the chunks a span needs
and ``read_from_buffers`` decodes the bytes we fetched -- it never touches
the file. Otherwise zlib and numpy decode one chunk at a time
(:func:`_decode`). Both give byte-identical values (tests/granules/test_h5chunks.py);
hidefix decodes 2-6x faster (docs/performance.md).

Chunk indexes: h5coro walks none, and version-1 B-trees (all that superblock
v0/v2 files have, NSIDC's included) are walked here. The indexes of layout
messages version 4 and 5 (written with ``libver="v110"`` or later: fixed and
extensible arrays, version-2 B-trees, single and implicit chunks) are walked
by HDF5 itself through h5py (:func:`_index_by_hdf5`), reading through the
same driver; fetching and decoding chunks stays here. Where h5py is absent
(the Lambda layer) such a dataset is refused by its chunk index type.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from h5coro.h5coro import H5Coro
from h5coro.h5dataset import H5Dataset
from h5coro.h5metadata import H5Metadata

from magg_core.errors import PermanentError
from magg_core.granules.h5driver import ExactH5Coro, TruncatedFileError, UnsupportedFormatError

try:
    from h5coro_hidefix import Index as HidefixIndex
except ImportError:  # an optional, compiled dependency: zlib and numpy decode instead
    HidefixIndex = None

COMPACT, CONTIGUOUS, CHUNKED = 0, 1, 2
"""HDF5's data layout classes, as h5coro reports them."""
CHUNK_INDEX_TYPES = {
    1: "single chunk",
    2: "implicit",
    3: "fixed array",
    4: "extensible array",
    5: "version 2 B-tree",
}
"""Chunk indexes of data layout messages version 4 and 5 (HDF5 file format
specification, "Data Layout Message"), written when a file's low library
bound is v110 or later; h5coro decodes only version 3's version-1 B-trees."""
_BIG_ENDIAN_BIT, _VAX_ORDER_BIT = 0x100, 0x4000
"""Byte-order bits of a fixed- or floating-point datatype's class bit field
(bit 0, and bit 6 for floats), seen in the message's first little-endian word."""
_SUPPORTED_FILTERS = {H5Metadata.DEFLATE_FILTER, H5Metadata.SHUFFLE_FILTER}
_BTREE_ENTRY = np.dtype(
    [("size", "<u4"), ("mask", "<u4"), ("offset", "<u8"), ("zero", "<u8"), ("child", "<u8")]
)
"""A 1-D chunk B-tree key (stored size, filter mask, row offset, element offset 0)
followed by the child address it bounds (offset size 8, as h5py and NSIDC write)."""


class UnsupportedDatasetError(UnsupportedFormatError):
    """A dataset stored in a way this reader does not decode (it says which)."""


class ChunkIndexError(UnsupportedDatasetError):
    """A chunk index of data layout message version 4 or 5, which h5coro cannot walk."""


class CorruptFileError(PermanentError, ValueError):
    """A dataset whose stored structure contradicts itself (it says where, not what bytes)."""


class _Dataset(H5Dataset):
    """h5coro's object-header parser, refusing by name what it would misread or reject blindly.

    h5coro ignores a datatype's byte order (big-endian values would come back
    byte-swapped) and rejects every data layout message but version 3 with a
    generic error. Both messages are peeked at here before h5coro parses them.
    """

    def datatypeMsgHandler(self, msg_size, obj_hdr_flags, dlvl, meta=None):
        if meta is None:  # the dataset's own type, not an attribute's
            word = int.from_bytes(self.resourceObject.ioRequest(self.pos, 4), "little")
            if word & 0x0F == H5Metadata.FLOATING_POINT_TYPE and word & _VAX_ORDER_BIT:
                raise UnsupportedDatasetError(f"{self.dataset}: VAX floating-point byte order")
            # Kept on the metadata, which h5coro caches per path, so a second
            # lookup that skips this parser still knows the byte order.
            self.meta.big_endian = bool(word & _BIG_ENDIAN_BIT)
        return super().datatypeMsgHandler(msg_size, obj_hdr_flags, dlvl, meta)

    def datalayoutMsgHandler(self, msg_size, obj_hdr_flags, dlvl):
        version, layout = bytes(self.resourceObject.ioRequest(self.pos, 2))
        if version >= 4 and layout == CHUNKED:
            # flags, dimensionality, bytes per dimension size, the sizes, index type
            head = bytes(self.resourceObject.ioRequest(self.pos + 2, 3))
            at = self.pos + 5 + head[1] * head[2]
            kind = bytes(self.resourceObject.ioRequest(at, 1))[0]
            name = CHUNK_INDEX_TYPES.get(kind, f"type {kind}")
            raise ChunkIndexError(f"{self.dataset}: chunk index type: {name}")
        if version != 3:
            raise UnsupportedDatasetError(f"{self.dataset}: data layout version {version}")
        return super().datalayoutMsgHandler(msg_size, obj_hdr_flags, dlvl)


@dataclass(frozen=True)
class Chunk:
    first_row: int
    address: int
    """Relative to the file's base address, as HDF5 stores it."""
    size: int
    """Stored (compressed) bytes."""


@dataclass(frozen=True)
class Column:
    """Where a 1-D dataset's bytes are and how to decode them."""

    path: str
    dtype: np.dtype
    n_rows: int
    chunk_rows: int
    chunks: tuple[Chunk, ...]
    """Sorted by ``first_row``; rows no chunk covers hold ``fill``."""
    deflate: bool
    shuffle: bool
    fill: np.generic


def index_column(h5: H5Coro, path: str) -> Column | None:
    """The chunk index of dataset ``path``, or ``None`` if the file has no such dataset.

    Costs the object header (usually shared with its neighbours' in
    h5coro's metadata cache) and one B-tree node per 64 chunks.
    """
    try:
        meta = _Dataset(h5, path, earlyExit=True, metaOnly=True, enableAttributes=False).meta
    except ChunkIndexError as refusal:
        return _index_by_hdf5(h5, path, refusal)
    if meta.typeSize == 0:
        return None
    try:
        dtype = np.dtype(H5Metadata.TO_NUMPY_TYPE[meta.type][meta.signedval][meta.typeSize])
    except KeyError:
        raise UnsupportedDatasetError(f"{path}: unsupported datatype") from None
    if getattr(meta, "big_endian", False):
        dtype = dtype.newbyteorder(">")
    if meta.ndims != 1:
        raise UnsupportedDatasetError(f"{path}: {meta.ndims}-D, only 1-D datasets are read")
    filters = {f for f, used in meta.filter.items() if used}
    if filters - _SUPPORTED_FILTERS:
        raise UnsupportedDatasetError(f"{path}: unsupported HDF5 filter(s) {sorted(filters)}")
    fill = dtype.type(0)
    if meta.fillsize == dtype.itemsize and meta.fillvalue is not None:
        fill = np.frombuffer(meta.fillvalue.to_bytes(meta.fillsize, "little"), dtype)[0]
    n_rows = int(meta.dimensions[0])
    allocated = meta.address != _undefined_address(h5)
    if meta.layout == CHUNKED:
        chunk_rows = int(meta.chunkDimensions[0])
        chunks = (
            tuple(_btree_chunks(h5, path, meta.address, chunk_rows, n_rows)) if allocated else ()
        )
    elif meta.layout in (COMPACT, CONTIGUOUS):
        chunk_rows = max(n_rows, 1)
        stored = n_rows and allocated
        chunks = (Chunk(0, meta.address, n_rows * dtype.itemsize),) if stored else ()
        filters = set()
    else:
        raise UnsupportedDatasetError(f"{path}: unsupported data layout {meta.layout}")
    return Column(
        path=path,
        dtype=dtype,
        n_rows=n_rows,
        chunk_rows=chunk_rows,
        chunks=chunks,
        deflate=H5Metadata.DEFLATE_FILTER in filters,
        shuffle=H5Metadata.SHUFFLE_FILTER in filters,
        fill=fill,
    )


def _index_by_hdf5(h5: ExactH5Coro, path: str, refusal: ChunkIndexError) -> Column:
    """The chunk index of ``path`` as HDF5 itself walks it (layout message version 4 or 5).

    HDF5 reads the file through :meth:`ExactH5Coro.hdf5`, i.e. the same
    driver (its bytes are counted); it lists the chunks in one pass
    (``H5Dchunk_iter``, HDF5 >= 1.14), and the chunks are then fetched and
    decoded by :func:`read_spans` like any other.

    Raises
    ------
    ChunkIndexError
        ``refusal``, where h5py is not installed.
    UnsupportedDatasetError
        For what :func:`index_column` refuses too.
    CorruptFileError
        If HDF5 cannot read the file's structure (h5py's plain ``OSError``;
        the driver's own errors, which h5py passes through unchanged, keep
        their type so that a dropped connection is still seen as transient).
    """
    try:
        return _hdf5_column(h5, path)
    except ImportError:
        raise refusal from None
    except OSError as exc:
        if type(exc) is not OSError:
            raise
        raise CorruptFileError(f"{path}: HDF5 cannot read the file (truncated or damaged)") from exc


def _hdf5_column(h5: ExactH5Coro, path: str) -> Column:
    """The :class:`Column` of ``path`` from HDF5's own reading of the dataset."""
    dset = h5.hdf5()[path]
    if dset.dtype.kind not in "iuf" or dset.ndim != 1:
        raise UnsupportedDatasetError(f"{path}: only 1-D integer or float datasets are read")
    plist = dset.id.get_create_plist()
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    if filters - _SUPPORTED_FILTERS:
        raise UnsupportedDatasetError(f"{path}: unsupported HDF5 filter(s) {sorted(filters)}")
    stored = []
    dset.id.chunk_iter(stored.append)
    if any(info.filter_mask for info in stored):
        raise UnsupportedDatasetError(f"{path}: chunks with skipped filters")
    chunks = sorted(
        (Chunk(i.chunk_offset[0], i.byte_offset - h5.baseAddress, i.size) for i in stored),
        key=lambda c: c.first_row,
    )
    return Column(
        path=path,
        dtype=dset.dtype,
        n_rows=dset.shape[0],
        chunk_rows=dset.chunks[0],
        chunks=tuple(chunks),
        deflate=H5Metadata.DEFLATE_FILTER in filters,
        shuffle=H5Metadata.SHUFFLE_FILTER in filters,
        fill=dset.dtype.type(dset.fillvalue),
    )


def _undefined_address(h5: H5Coro) -> int:
    """HDF5's "undefined address" (all bits set): storage never allocated, e.g. zero rows."""
    return 2 ** (8 * h5.offsetSize) - 1


def _btree_chunks(
    h5: H5Coro, path: str, address: int, chunk_rows: int, n_rows: int, level: int | None = None
) -> list:
    """Every chunk below the B-tree node at ``address``, in row order.

    ``level`` is the level the parent node promised (``None`` at the root):
    a child at any other level is damage, and checking it also keeps a
    corrupt tree from sending the walk round in a loop.
    """
    if h5.offsetSize != 8:
        raise UnsupportedDatasetError(f"{path}: offset size {h5.offsetSize}, only 8 is read")
    header = bytes(H5Coro.ioRequest(h5, address, 24))  # through the metadata cache
    if header[:4] != b"TREE" or header[4] != 1 or level not in (None, header[5]):
        raise CorruptFileError(f"{path}: a chunk B-tree node is damaged")
    level, entries = header[5], int.from_bytes(header[6:8], "little")
    body = H5Coro.ioRequest(h5, address + 24, entries * _BTREE_ENTRY.itemsize)
    table = np.frombuffer(body, _BTREE_ENTRY, count=entries)
    if level > 0:
        return [
            chunk
            for child in table["child"]
            for chunk in _btree_chunks(h5, path, int(child), chunk_rows, n_rows, level - 1)
        ]
    if (
        np.any(table["mask"] != 0)
        or np.any(table["offset"] % chunk_rows)
        or np.any(table["offset"] >= max(n_rows, 1))
    ):
        raise UnsupportedDatasetError(f"{path}: chunks with skipped filters or odd offsets")
    return [
        Chunk(int(row), int(child), int(size))
        for row, child, size in zip(table["offset"], table["child"], table["size"], strict=True)
    ]


def read_spans(
    h5: H5Coro,
    column: Column,
    spans: Sequence[tuple[int, int]],
    *,
    hidefix: bool = True,
) -> list[np.ndarray]:
    """The values of ``column`` in each half-open row span: :func:`read_columns` of one column."""
    return read_columns(h5, [(column, spans)], hidefix=hidefix)[0]


def read_columns(
    h5: H5Coro,
    wanted: Sequence[tuple[Column, Sequence[tuple[int, int]]]],
    *,
    hidefix: bool = True,
) -> list[list[np.ndarray]]:
    """Each column's values in each of its half-open row spans, the chunks of all fetched together.

    Only chunks overlapping a span are fetched, in as few requests as
    :func:`_runs` allows: a beam's variables often lie next to each other in
    the file (NSIDC's ``h_li`` and ``h_li_sigma`` back to back), so reading
    them together costs one request instead of one per variable. Values come
    in native byte order whatever the file's. Chunks are decoded by
    h5coro-hidefix where it is installed, unless ``hidefix`` is false or
    some row of the column lies in no stored chunk (hidefix's manifest must
    list every chunk); by zlib and numpy otherwise. Tests run both and compare.

    Returns
    -------
    list[list[numpy.ndarray]]
        Per column of ``wanted``, one 1-D array per span, of the span's length.

    Raises
    ------
    TruncatedFileError
        If the file ends before a chunk does.
    CorruptFileError
        If a chunk does not inflate, or not to its size.
    ValueError
        If a span lies outside its dataset.
    """
    chosen = []
    for column, spans in wanted:
        for start, stop in spans:
            if not 0 <= start <= stop <= column.n_rows:
                raise ValueError(
                    f"{column.path}: rows [{start}, {stop}) outside 0..{column.n_rows}"
                )
        chosen.append(
            [
                c
                for c in column.chunks
                if any(c.first_row < b and c.first_row + column.chunk_rows > a for a, b in spans)
            ]
        )
    stored = _fetch(h5, [c for chunks in chosen for c in chunks])
    return [
        _decoded(column, [(c, stored[c.address]) for c in chunks], spans, hidefix)
        for (column, spans), chunks in zip(wanted, chosen, strict=True)
    ]


def _decoded(
    column: Column,
    fetched: list[tuple[Chunk, memoryview]],
    spans: Sequence[tuple[int, int]],
    hidefix: bool,
) -> list[np.ndarray]:
    """One column's values in each span, from its fetched chunks."""
    if hidefix and HidefixIndex is not None and _covers_every_row(column):
        return _decode_hidefix(column, fetched, spans)
    decoded = {c.first_row: _decode(column, data) for c, data in fetched}
    out = []
    for start, stop in spans:
        values = np.full(stop - start, column.fill, dtype=column.dtype.newbyteorder("="))
        for first, chunk in decoded.items():
            a, b = max(start, first), min(stop, first + column.chunk_rows)
            if a < b:
                values[a - start : b - start] = chunk[a - first : b - first]
        out.append(values)
    return out


MERGE_GAP_FRACTION = 1 / 16
"""The most bytes between two chunks that one request fetches with them, as a
fraction of the chunk bytes that request wants: so merged requests fetch at
most 1/16 (6.25 %) more than the chunks, well inside the cycle-scale target
of 1.2x the compressed bytes (docs/architecture.md §Targets). A request costs
a round trip (~20-30 ms to S3's first byte, the time of ~1 MB of transfer)
and a fee, so a small gap (a B-tree node between two datasets' chunks, a few
KiB) is cheaper fetched than skipped."""


def _runs(chunks: Sequence[Chunk]) -> list[list[Chunk]]:
    """``chunks`` (of any columns) in file order, grouped into one run per request.

    A chunk joins the run before it when the gap between them is at most
    :data:`MERGE_GAP_FRACTION` of the run's chunk bytes with it, so no run
    fetches more than that fraction beyond what it wants.
    """
    runs: list[list[Chunk]] = []
    run_bytes = 0  # chunk bytes of the last run, gaps not counted
    for c in sorted(chunks, key=lambda c: c.address):
        if runs:
            gap = c.address - (runs[-1][-1].address + runs[-1][-1].size)
            if 0 <= gap <= MERGE_GAP_FRACTION * (run_bytes + c.size):
                runs[-1].append(c)
                run_bytes += c.size
                continue
        runs.append([c])
        run_bytes = c.size
    return runs


def _fetch(h5: H5Coro, chunks: Sequence[Chunk]) -> dict[int, memoryview]:
    """Each chunk's stored bytes by its address, one exact request per run (:func:`_runs`)."""
    out = {}
    for run in _runs(chunks):
        start = run[0].address
        size = run[-1].address + run[-1].size - start
        data = memoryview(h5.driver.read(start + h5.baseAddress, size))
        if len(data) < size:
            raise TruncatedFileError(f"needed {size} bytes at offset {start}, the file ends sooner")
        out.update((c.address, data[c.address - start : c.address - start + c.size]) for c in run)
    return out


def _covers_every_row(column: Column) -> bool:
    """Every row lies in a stored chunk (hidefix's manifest must list them all).

    Not so for a dataset never written (no chunks: its rows hold the fill
    value) or one whose writer left chunks unallocated.
    """
    return len(column.chunks) == -(-column.n_rows // column.chunk_rows)


def _decode_hidefix(
    column: Column,
    fetched: list[tuple[Chunk, memoryview]],
    spans: Sequence[tuple[int, int]],
) -> list[np.ndarray]:
    """Each span's values decoded by h5coro-hidefix from the chunks we fetched.

    The manifest is our own index (``Index.from_chunks``: no file access);
    per span, ``read_plan`` lists the chunks in row order and
    ``read_from_buffers`` inflates, unshuffles and assembles them (in
    parallel, without the GIL), byte for byte as :func:`_decode` does.

    Raises
    ------
    CorruptFileError
        If a chunk does not decode, naming the dataset only: hidefix's own
        errors (a ``RuntimeError`` carrying a Rust backtrace, a
        ``ValueError``, a Rust panic) are not passed on. Anything else
        (a bug of ours) propagates as it is.

    Unlike :func:`_decode`, hidefix zero-fills a chunk whose deflate stream
    is well-formed (its Adler-32 checksum holds) but inflates to fewer bytes
    than the chunk holds; damaged bytes fail the checksum and are refused.
    Unfiltered chunks are checked for their size here, where hidefix would
    panic.
    """
    itemsize = column.dtype.itemsize
    if not column.deflate and any(c.size != column.chunk_rows * itemsize for c, _ in fetched):
        raise CorruptFileError(
            f"{column.path}: an unfiltered chunk stores a size other than "
            f"{column.chunk_rows * itemsize} bytes"
        )
    by_row = {c.first_row: data for c, data in fetched}
    manifest = {
        "dtype": column.dtype.str,
        "shape": [column.n_rows],
        "chunk_shape": [column.chunk_rows],
        "gzip": True if column.deflate else None,
        "shuffle": column.shuffle and itemsize > 1,
        "addrs": np.array([c.address for c in column.chunks], dtype=np.uint64),
        "sizes": np.array([c.size for c in column.chunks], dtype=np.uint64),
        "offsets": np.array([[c.first_row] for c in column.chunks], dtype=np.uint64),
    }
    out = []
    try:
        index = HidefixIndex.from_chunks("", {"/column": manifest})
        for start, stop in spans:
            if start == stop:
                out.append(np.empty(0, dtype=column.dtype.newbyteorder("=")))
                continue
            rows = index.read_plan("/column", start, stop)[2][:, 0]
            buffers = [by_row[int(row)] for row in rows]
            out.append(index.read_from_buffers("/column", buffers, start, stop))
    except (RuntimeError, ValueError):
        raise CorruptFileError(f"{column.path}: a compressed chunk does not inflate") from None
    except BaseException as exc:
        # pyo3's PanicException derives from BaseException and is importable from nowhere
        if type(exc).__name__ != "PanicException":
            raise
        raise CorruptFileError(f"{column.path}: a compressed chunk does not inflate") from None
    return out


def _decode(column: Column, data: memoryview) -> np.ndarray:
    """One chunk's values: inflate, then undo the byte shuffle."""
    try:
        raw = zlib.decompress(data) if column.deflate else data
    except zlib.error:
        raise CorruptFileError(f"{column.path}: a compressed chunk does not inflate") from None
    itemsize = column.dtype.itemsize
    if len(raw) != column.chunk_rows * itemsize:
        raise CorruptFileError(
            f"{column.path}: a chunk decodes to {len(raw)} bytes, "
            f"expected {column.chunk_rows * itemsize}"
        )
    values = np.frombuffer(raw, np.uint8)
    if column.shuffle and itemsize > 1:
        values = values.reshape(itemsize, -1).T.copy()
    return values.view(column.dtype).ravel()
