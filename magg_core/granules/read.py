"""Read the points of one parent cell from ATL06 granules, fetching little more than needed.

A granule crosses several parent cells, and a cell is read by its own worker,
so each worker should fetch only its own rows. ATL06 has no spatial index, so
reading a granule takes two phases, each a round of concurrent requests (one
thread per dataset, then one per beam; see :mod:`magg_core.granules.h5chunks` for
how datasets are read):

1. every beam's latitude and longitude, whole, to find the rows inside the
   parent -- and meanwhile the chunk indexes of the variables and the
   quality flag, so that phase 2 needs no metadata;
2. only the chunks holding those rows, of the variables and the quality flag.

Rows inside a parent are a few runs per beam (a track enters and leaves a
cell). Runs are merged into one span unless a whole chunk without wanted
rows lies between them, so the chunks decoded are exactly the chunks that
hold wanted rows. A beam's variables are fetched together, and a request
may also fetch a gap between chunks it wants, at most 1/16 of them
(:data:`~magg_core.granules.h5chunks.MERGE_GAP_FRACTION`).

Failure policy. A granule lacking a whole beam is normal in ATL06 (a beam
can be off or have no surface); its other beams are read. So is a beam whose
datasets exist with zero rows (HDF5 writes them without storage): a point
needs a value of every dataset the config names -- coordinates, variables,
quality flag -- so a beam in which any one of them has zero rows has no
point to give, whether the others are empty too or not, and the granule's
other beams are read. A missing, truncated or corrupt granule, a file in an
HDF5 format this reader does not decode (refused by the structure's name:
"unsupported", never "corrupt", when HDF5 itself reads it), a granule of
another product (its ``short_name``, or no beam with the config's group at
all: a real ATL07 file), a beam that lacks one of the datasets, or one whose
datasets have rows but disagree in length, raises :class:`GranuleReadError`;
an S3 answer cut short of an intact object raises a transient error instead
(:class:`~magg_core.granules.h5driver.ShortReadError`). The granule is not
what the catalog promised, and silently dropping part of it would bias
statistics. Reasons are our own words and never quote the file's bytes
(see :func:`_describe`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, TypeVar

import mortie
import numpy as np
import obstore.exceptions as obstore_errors
from h5coro.h5coro import H5Coro

from magg_core import morton
from magg_core.access.s3 import S3Credentials, S3Endpoint
from magg_core.config import PipelineConfig
from magg_core.errors import (
    CredentialsRejectedError,
    PermanentError,
    TransientReadError,
    is_transient,
    rejects_credentials,
    s3_answer,
)
from magg_core.granules.h5chunks import (
    Column,
    CorruptFileError,
    index_column,
    read_columns,
    read_spans,
)
from magg_core.granules.h5driver import (
    NotHDF5Error,
    S3Access,
    ShortReadError,
    TruncatedFileError,
    UnsupportedFormatError,
    UnsupportedURLError,
    open_h5,
)
from magg_core.schema import READ_DROPS, GranuleFailure, GranulePoints

MAX_REASON_CHARS = 300
BOX_MARGIN_DEG = 0.05
"""Margin (~5 km) of the cheap near-the-parent test, far above the error of
tracing a cell's curved edges at 32 points per side: the exact test still
sees every point that can be inside."""
DATASET_THREADS = 128
"""Threads reading datasets, shared by every granule read in this process
(one granule reads up to 6 beams x 5 datasets at once)."""
_DATASET_POOL = ThreadPoolExecutor(max_workers=DATASET_THREADS, thread_name_prefix="magg-dataset")
T = TypeVar("T")


class GranuleReadError(PermanentError):
    """A granule that cannot be read; ``reason`` says why in words, without secrets."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason

    def failure(self) -> GranuleFailure:
        return GranuleFailure(url=self.url, reason=self.reason)


@dataclass(frozen=True)
class _Beam:
    """Rows of one beam inside the parent, the spans that cover them, its variables' indexes."""

    group: str
    rows: np.ndarray
    spans: tuple[tuple[int, int], ...]
    index: Mapping[str, Column] = field(repr=False)


@dataclass(frozen=True)
class GranuleRead:
    """The good points of one granule in each of the parent cells it was read for."""

    url: str
    points: Mapping[int, GranulePoints] = field(repr=False)
    """Parent morton word → its points (every requested parent, possibly empty)."""
    bytes_fetched: int = 0
    """Bytes the driver read, metadata included (for the read-efficiency targets,
    docs/architecture.md §Targets)."""
    requests: int = 0


def read_parents(
    url: str,
    parents: Sequence[int],
    config: PipelineConfig,
    *,
    credentials: S3Credentials | None = None,
    endpoint: S3Endpoint | None = None,
) -> GranuleRead:
    """Read the good points of one granule inside each of several parent cells, in one pass.

    Good means: inside a parent, quality flag equal to the accepted value,
    and every variable finite and not equal to the fill value. The points
    inside a parent that are not good are counted in each parent's
    ``dropped``, by the first filter that drops them (:data:`READ_DROPS`),
    so that nothing leaves a run without a number. Each byte is
    fetched once however many parents share it, so reading a granule for
    every parent it crosses costs what reading it whole does, and reading it
    for one parent only the chunks that parent's rows lie in.

    Parameters
    ----------
    url
        ``s3://bucket/key``, a local path or a ``file://`` URL.
    parents
        Parent cells' morton words (uint64) at ``config.output.parent_order``.
    config
        Says which beams, datasets and quality filter to read, and the orders.
    credentials, endpoint
        For ``s3://`` only. ``credentials=None`` uses the ambient identity;
        ``endpoint=None`` means AWS itself (HTTPS, NSIDC's region).

    Raises
    ------
    GranuleReadError
        If the granule is missing, truncated or corrupt, in an HDF5 format
        this reader does not decode, another product than the config's, or a
        present beam lacks a dataset the config names (see the module's
        failure policy).
    """
    wanted = np.unique(np.asarray(parents, dtype=np.uint64))
    access = S3Access(credentials=credentials, endpoint=endpoint or S3Endpoint())
    with _reading(url, "cannot open"):
        h5 = open_h5(url, access)
    with h5:
        tasks = _Tasks()
        try:
            # Read beside phase 1 when the config names a product; else only to name a refusal.
            declared = None
            if config.data_source.product is not None:
                declared = tasks.submit(_declared_product, url, h5)
            beams, located, coordinates, valueless, has_beam = _locate(
                url, h5, tasks, wanted, config
            )
            if declared is not None or not has_beam:
                product = _declared_product(url, h5) if declared is None else declared.result()
                _check_product(url, product, has_beam, config)
            columns = _read_rows(url, h5, tasks, beams, config) if located.size else {}
        finally:
            tasks.settle()
        driver = h5.driver
    dropped = {"quality": np.empty(0, dtype=np.int64), "fill": valueless}
    if located.size:
        columns = _point_columns(columns, coordinates, config)
        quality, values = _good_rows(columns, config)
        dropped["quality"] = located[~quality]
        dropped["fill"] = np.concatenate([valueless, located[quality & ~values]])
        good = quality & values
        located = located[good]
        columns = {name: columns[name][good] for name in config.point_columns}
    else:
        columns = {name: np.empty(0, dtype=np.float32) for name in config.data_source.variables}
        empty = np.empty(0, dtype=np.float64)
        columns = _point_columns(columns, (empty, empty), config)
    return GranuleRead(
        url=url,
        points=_by_parent(url, wanted, located, columns, dropped, config),
        bytes_fetched=driver.bytes_fetched,
        requests=driver.requests,
    )


def read_granule(
    url: str,
    parent_morton: int,
    config: PipelineConfig,
    *,
    credentials: S3Credentials | None = None,
    endpoint: S3Endpoint | None = None,
) -> GranulePoints:
    """:func:`read_parents` for one parent: its points, with the granule's byte counts."""
    read = read_parents(url, [parent_morton], config, credentials=credentials, endpoint=endpoint)
    points = read.points[int(parent_morton)]
    return replace(points, bytes_fetched=read.bytes_fetched, requests=read.requests)


def _by_parent(
    url: str,
    parents: np.ndarray,
    located: np.ndarray,
    columns: Mapping[str, np.ndarray],
    dropped: Mapping[str, np.ndarray],
    config: PipelineConfig,
) -> dict[int, GranulePoints]:
    """Split the granule's points (in beam, then row order) by parent, keeping that order.

    ``located`` packs each point's parent position (high bits) and child
    index (low bits), see :func:`_child_index`; so does ``dropped``, for the
    points each filter left out, which are only counted per parent.
    """
    shift = np.int64(2 * (config.output.child_order - config.output.parent_order))
    which = located >> shift
    child = located & ((np.int64(1) << shift) - 1)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(parents.size + 1))
    counts = {
        reason: np.bincount(words >> shift, minlength=parents.size)
        for reason, words in dropped.items()
    }
    points = {}
    for i, parent in enumerate(parents):
        mine = order[bounds[i] : bounds[i + 1]]
        points[int(parent)] = GranulePoints(
            url=url,
            child_index=child[mine],
            columns={name: values[mine] for name, values in columns.items()},
            dropped={reason: int(counts[reason][i]) for reason in READ_DROPS},
        )
    return points


def _point_columns(
    columns: Mapping[str, np.ndarray],
    coordinates: tuple[np.ndarray, np.ndarray],
    config: PipelineConfig,
) -> dict[str, np.ndarray]:
    """The rows' datasets, plus (with a ``height_change`` section) the points' latitude,
    longitude (float64, as read in phase 1) and time, under the fragment's column names."""
    columns = dict(columns)
    empty = np.empty(0, dtype=np.float64)
    if config.height_change is not None:
        columns["latitude"] = coordinates[0].astype(np.float64)
        columns["longitude"] = coordinates[1].astype(np.float64)
        columns["time"] = columns.pop(config.height_change.time, empty).astype(np.float64)
    return columns


def _good_rows(
    columns: Mapping[str, np.ndarray], config: PipelineConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Two masks: accepted quality; and every variable finite and not the fill value."""
    source = config.data_source
    quality = columns[source.quality.dataset] == source.quality.accept
    good = np.ones(quality.shape, dtype=bool)
    for name in source.variables:
        values = columns[name]
        # Compare in the column's own type: float32(3.4028235e38) is not float64's 3.4028235e38.
        fill = (
            values.dtype.type(source.fill_value) if values.dtype.kind == "f" else source.fill_value
        )
        good &= np.isfinite(values) & (values != fill)
    return quality, good


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
            return permanent_failure(exc)

    if not urls:
        return [], []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(urls)))) as pool:
        outcomes = list(pool.map(one, urls))
    points = [o for o in outcomes if isinstance(o, GranulePoints)]
    failures = [o for o in outcomes if isinstance(o, GranuleFailure)]
    return points, failures


def permanent_failure(exc: GranuleReadError) -> GranuleFailure:
    """The granule's failure, if it is the granule's; otherwise raise for a retry.

    Refused credentials, throttling or a dropped connection say nothing about
    the granule: the work fails as a whole so it is retried (with fresh
    credentials), rather than leave this granule out.

    Raises
    ------
    CredentialsRejectedError, TransientReadError
        When the cause is S3 refusing the credentials, or transient.
    """
    cause = exc.__cause__
    if cause is not None and rejects_credentials(cause):
        raise CredentialsRejectedError(str(exc)) from exc
    if cause is not None and is_transient(cause):
        raise TransientReadError(str(exc)) from exc
    return exc.failure()


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


_SHORT_NAME = re.compile(r"^[A-Z0-9_-]{1,16}$")
"""A ``short_name`` quoted in a reason: a product name, never arbitrary file bytes."""


def _declared_product(url: str, h5: H5Coro) -> str | None:
    """The granule's own ``short_name`` (root attribute); ``None`` where HDF5 is absent or
    the file has none (h5py is left out of the Lambda layer: there only the beams tell)."""
    try:
        with _reading(url, "cannot read the file's short_name"):
            value = h5.root_attribute("short_name")
    except GranuleReadError as exc:
        if isinstance(exc.__cause__, ImportError):
            return None
        raise
    if value is None:
        return None
    value = np.asarray(value).reshape(-1)[:1].tolist()
    text = value[0] if value else ""
    return text.decode("ascii", "replace") if isinstance(text, bytes) else str(text)


def _check_product(url: str, declared: str | None, has_beam: bool, config: PipelineConfig) -> None:
    """Refuse a granule of another product, by name, rather than read it as 0 points.

    Two signs, either enough: the file's ``short_name`` is not the config's
    ``product``, or none of the config's beams has the config's beam group
    (a real ATL07 file has ``gt1l/sea_ice_segments`` and no
    ``land_ice_segments``). An ATL06 beam may be missing, not all of them.
    """
    source = config.data_source
    expected = source.product or "the configured product"
    if declared is None:
        what = "its short_name is not stated"
    elif _SHORT_NAME.match(declared):
        what = f"its short_name says {declared}"
    else:
        what = "its short_name is not a product name"
    if source.product is not None and declared is not None and declared != source.product:
        raise GranuleReadError(url, f"not {expected} but another product: {what}")
    if not has_beam:
        groups = source.beam_group("{beam}")
        raise GranuleReadError(
            url,
            f"not {expected}: none of the beams {', '.join(source.beams)} has the group "
            f"{groups} ({what})",
        )


def _locate(
    url: str, h5: H5Coro, tasks: _Tasks, parents: np.ndarray, config: PipelineConfig
) -> tuple[list[_Beam], np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray, bool]:
    """Phase 1: which rows of which beam fall in a parent, and where (see :func:`_child_index`).

    Also returns those rows' latitudes and longitudes, aligned with the located
    points, and where the points lie that a parent holds but that have no
    values (their beam has a dataset without rows), to be counted as dropped;
    and whether any of the config's beam groups exists at all.

    Every beam's coordinates are read whole; as soon as the latitude's
    metadata has located the beam's group, the chunk indexes of the beam's
    variables are read too, so that phase 2 is a single round of chunk
    fetches. A beam with an empty dataset gives no rows (module docstring).
    """
    source = config.data_source
    coordinates = (source.latitude, source.longitude)
    wanted = {}
    for beam in source.beams:
        group = source.beam_group(beam)
        variables = tuple(f"{group}/{name}" for name in _row_variables(config))
        lat = tasks.submit(_whole, h5, tasks, f"{group}/{source.latitude}", variables)
        wanted[beam] = (lat, tasks.submit(_whole, h5, tasks, f"{group}/{source.longitude}", ()))
    with _reading(url, "cannot read coordinates"):
        values = {beam: (lat.result(), lon.result()) for beam, (lat, lon) in wanted.items()}
    present = []
    has_beam = False
    for beam, (lat, lon) in values.items():
        if lat.column is None and lon.column is None and _beam_missing(url, h5, beam, config):
            continue
        has_beam = True
        for name, value in zip(coordinates, (lat, lon), strict=True):
            if value.column is None:
                path = f"{source.beam_group(beam)}/{name}"
                raise GranuleReadError(url, f"dataset {path} is missing or unreadable")
        if lat.values.size == 0 or lon.values.size == 0:
            continue
        if lat.values.shape != lon.values.shape:
            group = source.beam_group(beam)
            raise GranuleReadError(url, f"{group}: {' and '.join(coordinates)} differ in length")
        present.append(beam)
    if not present:
        nowhere = np.empty(0, dtype=np.float64)
        empty = np.empty(0, dtype=np.int64)
        return [], empty, (nowhere, nowhere), empty, has_beam

    lat = np.concatenate([values[b][0].values for b in present])
    lon = np.concatenate([values[b][1].values for b in present])
    inside, located = _child_index(lat, lon, parents, config)
    beams = []
    kept = np.ones(located.size, dtype=bool)
    offset = position = 0
    for beam in present:
        latitude = values[beam][0]
        rows = np.flatnonzero(inside[offset : offset + latitude.values.size])
        offset += latitude.values.size
        if rows.size:
            index = _variable_indexes(url, source.beam_group(beam), latitude.neighbours)
            if any(column.n_rows == 0 for column in index.values()):
                kept[position : position + rows.size] = False
            else:
                spans = row_spans(rows, latitude.column.chunk_rows)
                beams.append(_Beam(source.beam_group(beam), rows, spans, index))
        position += rows.size
    return beams, located[kept], (lat[inside][kept], lon[inside][kept]), located[~kept], True


def _variable_indexes(
    url: str, group: str, pending: Mapping[str, Future[Column | None]]
) -> dict[str, Column]:
    """The chunk indexes of a beam's variables and quality flag, each required to exist."""
    with _reading(url, "cannot read variables"):
        indexes = {name: future.result() for name, future in pending.items()}
    for name, column in indexes.items():
        if column is None:
            raise GranuleReadError(url, f"dataset {group}/{name} is missing or unreadable")
    return indexes


def _row_variables(config: PipelineConfig) -> tuple[str, ...]:
    """The datasets read at the located rows: the variables and the quality flag."""
    source = config.data_source
    time = (config.height_change.time,) if config.height_change is not None else ()
    return (*source.variables, source.quality.dataset, *time)


@dataclass(frozen=True)
class _Whole:
    """A dataset read whole (``None``s if the file lacks it), and its neighbours' indexes."""

    column: Column | None
    values: np.ndarray | None
    neighbours: Mapping[str, Future[Column | None]]


def _whole(h5: H5Coro, tasks: _Tasks, path: str, neighbours: Sequence[str]) -> _Whole:
    """Dataset ``path`` read whole; then start indexing ``neighbours`` in the same group.

    Looking up a dataset walks its group's links in Python, character by
    character; once done for ``path``, h5coro remembers every link of the
    group and its neighbours are found without a walk.
    """
    column = _index(h5, path)
    indexes = {p.rpartition("/")[2]: tasks.submit(_index, h5, p) for p in neighbours}
    if column is None:
        return _Whole(None, None, indexes)
    return _Whole(column, read_spans(h5, column, [(0, column.n_rows)])[0], indexes)


_NAMED_FAILURES = (
    GranuleReadError,
    UnsupportedFormatError,
    CorruptFileError,
    TruncatedFileError,
    NotHDF5Error,
    TransientReadError,
    OSError,
    obstore_errors.BaseError,
)
"""Failures that already say what they are; anything else is h5coro tripping on the file."""


def _index(h5: H5Coro, path: str) -> Column | None:
    """:func:`~magg_core.granules.h5chunks.index_column`, with h5coro's own failures told apart.

    h5coro raises whatever its parser trips over, on a damaged file and on a
    valid structure it does not parse alike. HDF5 itself tells the two apart
    (:func:`_parser_failure`), so a valid file is never called corrupt.
    """
    try:
        return index_column(h5, path)
    except _NAMED_FAILURES:
        raise
    except Exception as exc:  # untrusted bytes, see _reading
        raise _parser_failure(h5, path, exc) from exc


def _parser_failure(h5: H5Coro, path: str, exc: Exception) -> Exception:
    """What h5coro's failure on ``path`` means, as HDF5 reading the same bytes sees it.

    Returns :class:`UnsupportedFormatError` naming the structure when HDF5
    reads the dataset (a soft or external link on the way, or the dataset's
    layout and type), :class:`CorruptFileError` when HDF5 cannot either, and
    ``exc`` itself where h5py is absent (the Lambda layer): then the reason
    says only which parser failed.
    """
    kind = type(exc).__name__
    try:
        f = h5.hdf5()
    except ImportError:
        return exc
    except Exception as failed:  # untrusted bytes, or the driver's own errors passed through
        return _unless_passing(failed) or CorruptFileError(
            f"{path}: neither h5coro ({kind}) nor HDF5 can open the file"
        )
    try:
        structure = _hdf5_structure(f, path)
    except Exception as failed:
        return _unless_passing(failed) or CorruptFileError(
            f"{path}: neither h5coro ({kind}) nor HDF5 can read it"
        )
    return UnsupportedFormatError(f"{path}: {structure}, which HDF5 reads but h5coro does not")


def _unless_passing(exc: Exception) -> Exception | None:
    """``exc`` if it says nothing about the file (refused credentials, a transient S3
    failure, which HDF5 passes through from the driver), so it is retried; else ``None``."""
    return exc if rejects_credentials(exc) or is_transient(exc) else None


def _hdf5_structure(f: Any, path: str) -> str:
    """The structure at ``path`` in our words: a link kind on the way, else the dataset's layout.

    Raises whatever HDF5 raises if it cannot read the dataset's first row.
    """
    import h5py

    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        link = f.get(prefix, getlink=True)
        if isinstance(link, h5py.SoftLink):
            return f"a soft link at {prefix}"
        if isinstance(link, h5py.ExternalLink):
            return f"an external link at {prefix}"
        if link is None:
            raise KeyError(prefix)
    dataset = f[path]
    dataset[:1]
    layout = {0: "compact", 1: "contiguous", 2: "chunked", 3: "virtual"}.get(
        dataset.id.get_create_plist().get_layout(), "unknown"
    )
    return f"a {dataset.ndim}-D {layout} dataset of {dataset.dtype.str}"


def _child_index(
    lat: np.ndarray, lon: np.ndarray, parents: np.ndarray, config: PipelineConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Which points lie in one of ``parents`` (sorted), and which parent and child that is.

    Returns a flag per point and, for the points inside, ``position <<
    2·(child_order − parent_order) | child`` (int64): the parent's position
    in ``parents`` and the child's in that parent (see :func:`morton.children`).

    A granule runs ~2,900 km and a parent is ~100 km across, so when few
    parents are wanted most coordinates are far away; a bounding-box test
    costs a few ns a point, the exact HEALPix assignment 35-150 ns.
    """
    parent_order, child_order = config.output.parent_order, config.output.child_order
    shift = np.uint64(2 * (child_order - parent_order))
    near = np.zeros(lat.shape, dtype=bool)
    for parent in parents:
        near |= _near_parent(lat, lon, int(parent), parent_order)
    near = np.flatnonzero(near)
    words = morton.point_morton(lat[near], lon[near], child_order)
    ancestors = morton.parent_of(words, parent_order)
    position = np.searchsorted(parents, ancestors)
    found = position < parents.size
    found[found] = parents[position[found]] == ancestors[found]
    first = morton.healpix_ids(parents) << shift
    child = morton.healpix_ids(words[found]) - first[position[found]]
    inside = np.zeros(lat.shape, dtype=bool)
    inside[near[found]] = True
    located = (position[found].astype(np.uint64) << shift) | child
    return inside, located.astype(np.int64)


def _near_parent(
    lat: np.ndarray, lon: np.ndarray, parent_morton: int, parent_order: int
) -> np.ndarray:
    """A superset of the points inside the parent: its latitude band, then its longitudes."""
    south, north, centre, half_width = _parent_box(parent_morton, parent_order)
    near = (lat >= south) & (lat <= north)
    if half_width is not None:
        candidates = np.flatnonzero(near)
        offset = (lon[candidates] - centre + 180.0) % 360.0 - 180.0
        near[candidates[np.abs(offset) > half_width]] = False
    return near


@lru_cache(maxsize=256)
def _parent_box(parent_morton: int, parent_order: int) -> tuple[float, float, float, float | None]:
    """``(south, north, centre_lon, half_width_lon)`` enclosing a parent with a margin.

    Drawn from the cell's outline traced at 32 points per side. Latitude and
    longitude extremes of a cell lie on its outline unless it touches a pole;
    there the box extends to the pole and longitude is not tested
    (``half_width_lon`` is ``None``).
    """
    ring = np.asarray(mortie.mort2polygon(np.uint64(parent_morton), step=32), dtype=np.float64)
    lats, lons = ring[:, 0], ring[:, 1]
    south, north = lats.min() - BOX_MARGIN_DEG, lats.max() + BOX_MARGIN_DEG
    if north >= 89.5 or south <= -89.5:
        return max(south, -90.0), min(north, 90.0), 0.0, None
    centre = float(
        np.degrees(np.arctan2(np.sin(np.radians(lons)).sum(), np.cos(np.radians(lons)).sum()))
    )
    offset = (lons - centre + 180.0) % 360.0 - 180.0
    widest = max(abs(south), abs(north))
    half_width = np.abs(offset).max() + BOX_MARGIN_DEG / np.cos(np.radians(widest))
    return float(south), float(north), centre, float(half_width) if half_width < 90 else None


def _beam_missing(url: str, h5: H5Coro, beam: str, config: PipelineConfig) -> bool:
    """True if the granule has no such beam group at all (rather than a broken one)."""
    group = config.data_source.beam_group(beam)
    parent, _, name = group.rpartition("/")
    with _reading(url, f"cannot read group {parent or '/'}"):
        links, _, _ = h5.inspectPath(parent or "/", w_attr=False)
    return name not in links


def _read_rows(
    url: str, h5: H5Coro, tasks: _Tasks, beams: list[_Beam], config: PipelineConfig
) -> dict[str, np.ndarray]:
    """Phase 2: the variables and the quality flag at the located rows, all fetched at once.

    One task per beam reads all of them together (:func:`_at_rows`): a beam's
    variables often lie next to each other in the file, and fetched together
    they cost one request instead of one each.
    """
    names = _row_variables(config)
    pending = {}
    for beam in beams:
        columns = [beam.index[name] for name in names]
        for column in columns:
            if column.n_rows < beam.spans[-1][1]:
                raise GranuleReadError(
                    url, f"dataset {column.path} is shorter than the coordinates"
                )
        pending[beam.group] = tasks.submit(_at_rows, h5, beam, columns)
    with _reading(url, "cannot read variables"):
        values = {group: future.result() for group, future in pending.items()}
    return {
        name: np.concatenate([values[b.group][i] for b in beams]) for i, name in enumerate(names)
    }


def _at_rows(h5: H5Coro, beam: _Beam, columns: list[Column]) -> list[np.ndarray]:
    """Each of a beam's ``columns`` at the beam's rows, in row order."""
    picked = [
        beam.rows[(beam.rows >= start) & (beam.rows < stop)] - start for start, stop in beam.spans
    ]
    return [
        np.concatenate([values[rows] for values, rows in zip(parts, picked, strict=True)])
        for parts in read_columns(h5, [(column, beam.spans) for column in columns])
    ]


class _Tasks:
    """The dataset reads of one granule, run on the threads all granules share.

    Threads are reused rather than started per granule: starting ~30 threads
    for every granule cost more CPU than parsing its metadata.
    """

    def __init__(self) -> None:
        self._futures: list[Future] = []

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        future = _DATASET_POOL.submit(fn, *args)
        self._futures.append(future)
        return future

    def settle(self) -> None:
        """Wait for every task, including tasks started by tasks, so byte counts are final."""
        while not all(f.done() for f in self._futures):
            wait(list(self._futures))


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
    """A one-line reason in our own words, never text built from the file's bytes.

    h5coro's messages quote what it read (an invalid signature as hex, link
    names, raw field values) and obstore's quote the server's reply, which
    may run to dozens of debug lines. So only the messages of our own
    exceptions are passed on -- built from numbers we parsed ourselves and
    paths from the config -- and otherwise the exception's type name, with
    the HTTP status for S3 failures.
    """
    kind = type(exc).__name__
    status = s3_answer(exc)[0] if isinstance(exc, obstore_errors.BaseError) else None
    http = f", HTTP {status}" if status else ""
    if isinstance(exc, UnsupportedURLError):
        reason = str(exc)
    elif isinstance(exc, ShortReadError):
        reason = f"transient read error ({exc})"
    elif isinstance(exc, NotHDF5Error):
        reason = f"not an HDF5 file ({exc})"
    elif isinstance(exc, UnsupportedFormatError):
        reason = f"unsupported format ({exc})"
    elif isinstance(exc, CorruptFileError):
        reason = f"corrupt HDF5 ({exc})"
    elif isinstance(exc, TruncatedFileError) or status == 416:
        reason = "file is truncated (a read went past the end of the object)"
    elif isinstance(
        exc,
        PermissionError
        | obstore_errors.PermissionDeniedError
        | obstore_errors.UnauthenticatedError,
    ):
        reason = f"access denied ({kind}{http})"
    elif isinstance(exc, obstore_errors.BaseError):
        reason = f"S3 request failed ({kind}{http})"
    elif isinstance(exc, OSError):
        reason = f"cannot read the file ({kind})"
    else:
        reason = f"truncated or corrupt HDF5 (the parser failed with {kind})"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    return reason
