"""1-D HDF5 datasets read in few requests: index the chunks once, fetch adjacent chunks together.

h5coro reads a chunked dataset one chunk at a time -- request, wait, inflate,
next request -- so on S3 every chunk costs a round trip, one after another:
a real ATL06 beam has ~15 chunks per coordinate, and reading a granule's
coordinates took ~15 round trips in a row. Here h5coro still parses what it
parses well (superblock, groups, object headers), but the data path is ours:

1. :func:`index_column` reads the dataset's chunk B-tree (version 1, the only
   kind superblock v0/v2 files have) into a list of chunks: first row, file
   address, stored size;
2. :func:`read_spans` takes the chunks that overlap the wanted row spans,
   groups those lying back to back in the file (HDF5 writers put a dataset's
   chunks one after another) into *runs*, fetches each run with one exact
   ranged request, and decodes with zlib and numpy.

A whole coordinate is then one request instead of fifteen, and the bytes
fetched are exactly the chunks' stored bytes.

Only what ATL06 uses is supported: 1-D integer or float datasets, chunked
with optional shuffle + deflate (or contiguous/compact, read as one
uncompressed "chunk"). Anything else raises :class:`UnsupportedDatasetError`
rather than returning wrong numbers.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from h5coro.h5coro import H5Coro
from h5coro.h5dataset import H5Dataset
from h5coro.h5metadata import H5Metadata

from magg_core.h5driver import TruncatedFileError

COMPACT, CONTIGUOUS, CHUNKED = 0, 1, 2
"""HDF5's data layout classes, as h5coro reports them."""
_SUPPORTED_FILTERS = {H5Metadata.DEFLATE_FILTER, H5Metadata.SHUFFLE_FILTER}
_BTREE_ENTRY = np.dtype(
    [("size", "<u4"), ("mask", "<u4"), ("offset", "<u8"), ("zero", "<u8"), ("child", "<u8")]
)
"""A 1-D chunk B-tree key (stored size, filter mask, row offset, element offset 0)
followed by the child address it bounds (offset size 8, as h5py and NSIDC write)."""


class UnsupportedDatasetError(ValueError):
    """A dataset stored in a way this reader does not decode (it says which)."""


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
    meta = H5Dataset(h5, path, earlyExit=True, metaOnly=True, enableAttributes=False).meta
    if meta.typeSize == 0:
        return None
    try:
        dtype = np.dtype(H5Metadata.TO_NUMPY_TYPE[meta.type][meta.signedval][meta.typeSize])
    except KeyError:
        raise UnsupportedDatasetError(f"{path}: unsupported datatype") from None
    if meta.ndims != 1:
        raise UnsupportedDatasetError(f"{path}: {meta.ndims}-D, only 1-D datasets are read")
    filters = {f for f, used in meta.filter.items() if used}
    if filters - _SUPPORTED_FILTERS:
        raise UnsupportedDatasetError(f"{path}: unsupported HDF5 filter(s) {sorted(filters)}")
    fill = dtype.type(0)
    if meta.fillsize == dtype.itemsize and meta.fillvalue is not None:
        fill = np.frombuffer(meta.fillvalue.to_bytes(meta.fillsize, "little"), dtype)[0]
    n_rows = int(meta.dimensions[0])
    if meta.layout == CHUNKED:
        chunk_rows = int(meta.chunkDimensions[0])
        chunks = tuple(_btree_chunks(h5, path, meta.address, chunk_rows, n_rows))
    elif meta.layout in (COMPACT, CONTIGUOUS):
        chunk_rows = max(n_rows, 1)
        chunks = (Chunk(0, meta.address, n_rows * dtype.itemsize),) if n_rows else ()
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


def _btree_chunks(h5: H5Coro, path: str, address: int, chunk_rows: int, n_rows: int) -> list:
    """Every chunk below the B-tree node at ``address``, in row order."""
    if h5.offsetSize != 8:
        raise UnsupportedDatasetError(f"{path}: offset size {h5.offsetSize}, only 8 is read")
    header = bytes(H5Coro.ioRequest(h5, address, 24))  # through the metadata cache
    if header[:4] != b"TREE" or header[4] != 1:
        raise ValueError(f"{path}: invalid chunk B-tree node at {address}")
    level, entries = header[5], int.from_bytes(header[6:8], "little")
    body = H5Coro.ioRequest(h5, address + 24, entries * _BTREE_ENTRY.itemsize)
    table = np.frombuffer(body, _BTREE_ENTRY, count=entries)
    if level > 0:
        return [
            chunk
            for child in table["child"]
            for chunk in _btree_chunks(h5, path, int(child), chunk_rows, n_rows)
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


def read_spans(h5: H5Coro, column: Column, spans: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """The values of ``column`` in each half-open row span, fetching only overlapping chunks.

    Raises
    ------
    TruncatedFileError
        If the file ends before a chunk does.
    ValueError
        If a span lies outside the dataset or a chunk does not decode to its size.
    """
    for start, stop in spans:
        if not 0 <= start <= stop <= column.n_rows:
            raise ValueError(f"{column.path}: rows [{start}, {stop}) outside 0..{column.n_rows}")
    wanted = [
        c
        for c in column.chunks
        if any(c.first_row < b and c.first_row + column.chunk_rows > a for a, b in spans)
    ]
    decoded = {c.first_row: _decode(column, data) for c, data in _fetch(h5, wanted)}
    out = []
    for start, stop in spans:
        values = np.full(stop - start, column.fill, dtype=column.dtype)
        for first, chunk in decoded.items():
            a, b = max(start, first), min(stop, first + column.chunk_rows)
            if a < b:
                values[a - start : b - start] = chunk[a - first : b - first]
        out.append(values)
    return out


def _fetch(h5: H5Coro, chunks: list[Chunk]) -> list[tuple[Chunk, memoryview]]:
    """Each chunk's stored bytes, one exact request per run of back-to-back chunks."""
    chunks = sorted(chunks, key=lambda c: c.address)
    runs: list[list[Chunk]] = []
    for c in chunks:
        if runs and runs[-1][-1].address + runs[-1][-1].size == c.address:
            runs[-1].append(c)
        else:
            runs.append([c])
    out = []
    for run in runs:
        start = run[0].address
        size = run[-1].address + run[-1].size - start
        data = memoryview(h5.driver.read(start + h5.baseAddress, size))
        if len(data) < size:
            raise TruncatedFileError(f"needed {size} bytes at offset {start}, the file ends sooner")
        out.extend((c, data[c.address - start : c.address - start + c.size]) for c in run)
    return out


def _decode(column: Column, data: memoryview) -> np.ndarray:
    """One chunk's values: inflate, then undo the byte shuffle."""
    raw = zlib.decompress(data) if column.deflate else data
    itemsize = column.dtype.itemsize
    if len(raw) != column.chunk_rows * itemsize:
        raise ValueError(
            f"{column.path}: a chunk decodes to {len(raw)} bytes, "
            f"expected {column.chunk_rows * itemsize}"
        )
    values = np.frombuffer(raw, np.uint8)
    if column.shuffle and itemsize > 1:
        values = values.reshape(itemsize, -1).T.copy()
    return values.view(column.dtype).ravel()
