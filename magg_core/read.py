"""Read the points of one parent cell from ATL06 granules, fetching little more than needed.

A granule crosses several parent cells, and a cell is read by its own worker,
so each worker should fetch only its own rows. ATL06 has no spatial index, so
reading a granule takes two phases, each one ``readDatasets`` call that
h5coro runs with one thread per dataset:

1. every beam's latitude and longitude, to find the rows inside the parent;
2. only the chunks holding those rows, of the variables and the quality flag.

Rows inside a parent are a few runs per beam (a track enters and leaves a
cell). Runs are merged into one hyperslice unless a whole chunk without
wanted rows lies between them, so the chunks fetched are exactly the chunks
that hold wanted rows. h5coro takes one hyperslice per dataset per call; the
rare beam that needs two (a track leaving a cell and coming back) costs an
extra round.

Failure policy. A granule lacking a whole beam is normal in ATL06 (a beam
can be off or have no surface); its other beams are read. A missing,
truncated or corrupt granule, or a beam that lacks one of the datasets the
config names, raises :class:`GranuleReadError`: the granule is not what the
catalog promised, and silently dropping part of it would bias statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import obstore.exceptions as obstore_errors
from h5coro.h5coro import H5Coro

from magg_core import grid
from magg_core.config import PipelineConfig
from magg_core.h5driver import S3Access, TruncatedFileError, UnsupportedURLError, open_h5
from magg_core.request import GranuleFailure
from magg_core.errors import TransientReadError, is_transient
from magg_core.s3 import S3Credentials, S3Endpoint

CHUNKED_LAYOUT = 2
"""h5coro's code for HDF5's chunked storage layout."""
MAX_REASON_CHARS = 300


class GranuleReadError(Exception):
    """A granule that cannot be read; ``reason`` says why in words, without secrets."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason

    def failure(self) -> GranuleFailure:
        return GranuleFailure(url=self.url, reason=self.reason)


@dataclass(frozen=True)
class GranulePoints:
    """The good points of one granule inside one parent cell.

    ``child_index`` (int64) is each point's child position in the parent,
    ``0 .. 4**(child_order - parent_order) - 1``; ``columns`` holds the
    config's variables, aligned with it, in the file's dtypes.
    """

    url: str
    child_index: np.ndarray
    columns: Mapping[str, np.ndarray] = field(repr=False)
    bytes_fetched: int = 0
    """Bytes the driver read, metadata included (for DESIGN §6's read-efficiency target)."""
    requests: int = 0

    def __len__(self) -> int:
        return int(self.child_index.size)


@dataclass(frozen=True)
class _Beam:
    """Rows of one beam inside the parent, and the hyperslices that cover them."""

    name: str
    rows: np.ndarray
    spans: tuple[tuple[int, int], ...]


def read_granule(
    url: str,
    parent_morton: int,
    config: PipelineConfig,
    *,
    credentials: S3Credentials | None = None,
    endpoint: S3Endpoint | None = None,
) -> GranulePoints:
    """Read the good points of one granule inside one parent cell.

    Good means: inside the parent, quality flag equal to the accepted value,
    and every variable finite and not equal to the fill value.

    Parameters
    ----------
    url
        ``s3://bucket/key``, a local path or a ``file://`` URL.
    parent_morton
        The parent cell's morton word (uint64) at ``config.output.parent_order``.
    config
        Says which beams, datasets and quality filter to read, and the orders.
    credentials, endpoint
        For ``s3://`` only. ``credentials=None`` uses the ambient identity;
        ``endpoint=None`` means AWS itself (HTTPS, NSIDC's region).

    Raises
    ------
    GranuleReadError
        If the granule is missing, truncated or corrupt, or a present beam
        lacks a dataset the config names.
    """
    access = S3Access(credentials=credentials, endpoint=endpoint or S3Endpoint())
    with _reading(url, "cannot open"):
        h5 = open_h5(url, access)
    with h5:
        beams, child_index = _locate(url, h5, parent_morton, config)
        columns = _read_rows(url, h5, beams, config) if child_index.size else {}
        driver = h5.driver
    source = config.data_source
    if child_index.size:
        good = _good_rows(columns, config)
        child_index = child_index[good]
        columns = {name: columns[name][good] for name in source.variables}
    else:
        columns = {name: np.empty(0, dtype=np.float32) for name in source.variables}
    return GranulePoints(
        url=url,
        child_index=child_index,
        columns=columns,
        bytes_fetched=driver.bytes_fetched,
        requests=driver.requests,
    )


def _good_rows(columns: Mapping[str, np.ndarray], config: PipelineConfig) -> np.ndarray:
    """Accepted quality, and every variable finite and not the fill value."""
    source = config.data_source
    good = columns[source.quality.dataset] == source.quality.accept
    for name in source.variables:
        values = columns[name]
        # Compare in the column's own type: float32(3.4028235e38) is not float64's 3.4028235e38.
        fill = (
            values.dtype.type(source.fill_value) if values.dtype.kind == "f" else source.fill_value
        )
        good &= np.isfinite(values) & (values != fill)
    return good


def read_granules(
    urls: Sequence[str],
    parent_morton: int,
    config: PipelineConfig,
    *,
    credentials: S3Credentials | None = None,
    endpoint: S3Endpoint | None = None,
    max_workers: int = 8,
) -> tuple[list[GranulePoints], list[GranuleFailure]]:
    """Read many granules for one parent, ``max_workers`` at a time.

    Reading is latency-bound (a few sequential requests per dataset), so
    granules overlap in threads. A granule that fails is reported, never
    fatal to the others. Results keep the order of ``urls`` so the same
    inputs always aggregate in the same order.
    """

    def one(url: str) -> GranulePoints | GranuleFailure:
        try:
            return read_granule(
                url, parent_morton, config, credentials=credentials, endpoint=endpoint
            )
        except GranuleReadError as exc:
            if exc.__cause__ is not None and is_transient(exc.__cause__):
                # Throttling or a dropped connection says nothing about the
                # granule: fail the whole cell so it is retried, rather than
                # write statistics with this granule's points missing.
                raise TransientReadError(str(exc)) from exc
            return exc.failure()

    if not urls:
        return [], []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(urls)))) as pool:
        outcomes = list(pool.map(one, urls))
    points = [o for o in outcomes if isinstance(o, GranulePoints)]
    failures = [o for o in outcomes if isinstance(o, GranuleFailure)]
    return points, failures


def row_spans(rows: np.ndarray, chunk_rows: int) -> tuple[tuple[int, int], ...]:
    """Half-open row ranges covering sorted ``rows`` without touching an unneeded chunk.

    Two neighbouring rows share a range unless a whole chunk lies strictly
    between their chunks: reading such a chunk would fetch bytes no wanted
    row lives in, while merging anything closer costs nothing, since h5coro
    fetches whole chunks anyway.
    """
    if rows.size == 0:
        return ()
    chunk = rows // chunk_rows
    breaks = np.flatnonzero(np.diff(chunk) > 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, rows.size - 1]] + 1
    return tuple((int(a), int(b)) for a, b in zip(starts, stops, strict=True))


def _locate(
    url: str, h5: H5Coro, parent_morton: int, config: PipelineConfig
) -> tuple[list[_Beam], np.ndarray]:
    """Phase 1: which rows of which beam fall in the parent, and their child index."""
    source = config.data_source
    paths = {
        beam: (
            f"{source.beam_group(beam)}/{source.latitude}",
            f"{source.beam_group(beam)}/{source.longitude}",
        )
        for beam in source.beams
    }
    with _reading(url, "cannot read coordinates"):
        promise = h5.readDatasets([p for pair in paths.values() for p in pair])
        values = {p: promise[p] for pair in paths.values() for p in pair}
    present = []
    for beam, (lat_path, lon_path) in paths.items():
        if (
            values[lat_path] is None
            and values[lon_path] is None
            and _beam_missing(url, h5, beam, config)
        ):
            continue
        for path in (lat_path, lon_path):
            if values[path] is None:
                raise GranuleReadError(url, f"dataset {path} is missing or unreadable")
        if values[lat_path].shape != values[lon_path].shape:
            raise GranuleReadError(url, f"{lat_path} and {lon_path} differ in length")
        present.append(beam)
    if not present:
        return [], np.empty(0, dtype=np.int64)

    lat = np.concatenate([values[paths[b][0]] for b in present])
    lon = np.concatenate([values[paths[b][1]] for b in present])
    inside, child_index = grid.child_index(
        lat, lon, parent_morton, config.output.parent_order, config.output.child_order
    )
    beams = []
    offset = 0
    for beam in present:
        n = values[paths[beam][0]].size
        rows = np.flatnonzero(inside[offset : offset + n])
        offset += n
        if rows.size:
            beams.append(_Beam(beam, rows, row_spans(rows, _chunk_rows(h5, paths[beam][0], n))))
    return beams, child_index.astype(np.int64)


def _beam_missing(url: str, h5: H5Coro, beam: str, config: PipelineConfig) -> bool:
    """True if the granule has no such beam group at all (rather than a broken one)."""
    group = config.data_source.beam_group(beam)
    parent, _, name = group.rpartition("/")
    with _reading(url, f"cannot read group {parent or '/'}"):
        links, _, _ = h5.inspectPath(parent or "/", w_attr=False)
    return name not in links


def _chunk_rows(h5: H5Coro, path: str, n_rows: int) -> int:
    """Rows per chunk of a dataset already read (all of it if not chunked)."""
    meta = h5.metadataTable.get(path)
    if meta is None or meta.layout != CHUNKED_LAYOUT or not meta.chunkDimensions:
        return max(n_rows, 1)
    return int(meta.chunkDimensions[0])


def _read_rows(
    url: str, h5: H5Coro, beams: list[_Beam], config: PipelineConfig
) -> dict[str, np.ndarray]:
    """Phase 2: the variables and the quality flag at the located rows."""
    source = config.data_source
    names = (*source.variables, source.quality.dataset)
    paths = {(b.name, n): f"{source.beam_group(b.name)}/{n}" for b in beams for n in names}
    columns: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for round_ in range(max(len(b.spans) for b in beams)):
        batch = [b for b in beams if round_ < len(b.spans)]
        with _reading(url, "cannot read variables"):
            promise = h5.readDatasets(
                [
                    {"dataset": paths[b.name, n], "hyperslice": [b.spans[round_]]}
                    for b in batch
                    for n in names
                ]
            )
            values = {
                key: promise[paths[key]] for key in ((b.name, n) for b in batch for n in names)
            }
        for b in batch:
            start, stop = b.spans[round_]
            local = b.rows[(b.rows >= start) & (b.rows < stop)] - start
            for n in names:
                array = values[b.name, n]
                if array is None:
                    raise GranuleReadError(
                        url, f"dataset {paths[b.name, n]} is missing or unreadable"
                    )
                if array.shape != (stop - start,):
                    raise GranuleReadError(
                        url, f"dataset {paths[b.name, n]} is shorter than the coordinates"
                    )
                columns[n].append(array[local])
    return {n: np.concatenate(arrays) for n, arrays in columns.items()}


@contextmanager
def _reading(url: str, what: str) -> Iterator[None]:
    """Turn h5coro's and obstore's failures on untrusted bytes into a GranuleReadError.

    h5coro parses files in Python: a truncated or corrupt file surfaces as
    whatever its parser trips over (``struct.error``, ``zlib.error``,
    ``KeyError``, its own ``RuntimeError`` …), so everything raised *inside*
    these blocks is the granule's fault; magg's own logic stays outside them
    so that its bugs still surface.
    """
    try:
        yield
    except GranuleReadError:
        raise
    except FileNotFoundError as exc:
        raise GranuleReadError(url, "granule not found") from exc
    except Exception as exc:  # untrusted bytes: see the docstring
        raise GranuleReadError(url, f"{what}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """A one-line reason: obstore's messages run to dozens of debug lines."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(detail) > MAX_REASON_CHARS:
        detail = detail[: MAX_REASON_CHARS - 1] + "…"
    if isinstance(exc, UnsupportedURLError):
        return text
    if isinstance(exc, TruncatedFileError) or "416 Range Not Satisfiable" in text:
        return "file is truncated (a read went past the end of the object)"
    if "invalid file signature" in text:
        return f"not an HDF5 file ({detail})"
    if isinstance(
        exc,
        PermissionError
        | obstore_errors.PermissionDeniedError
        | obstore_errors.UnauthenticatedError,
    ):
        return f"access denied ({detail})"
    if isinstance(exc, obstore_errors.BaseError):
        return f"S3 request failed ({detail})"
    return f"truncated or corrupt HDF5 ({detail})"
