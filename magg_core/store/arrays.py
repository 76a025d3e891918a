"""The Zarr v3 store: its template, one cell's write, and the checks in between.

Layout (docs/architecture.md §Store layout): group ``/{child_order}/`` holds 1-D arrays over the
dimension ``cells``; chunk ``i`` of every array is the ``i``-th parent cell of
the catalog (ascending morton order), so a cell worker writes exactly one
chunk per statistic and never touches another cell's bytes. The coordinates
``cell_ids`` and ``morton`` are written for every parent when the template is
created, so cells without data still have valid coordinates.

The group's attributes are written *last* when a template is created and act
as its commit marker: a group without them is an unfinished template that the
next :func:`create_template` rebuilds, and that :func:`check_template` rejects.
Per-cell records live beside the arrays (see :mod:`magg_core.store.records`).

Pyramid levels (``output.levels``, see :mod:`magg_core.store.staging` and
docs/levels.md): every other order ``k`` of the config gets a group ``/{k}/``
laid out the same way -- parents in catalog order, each parent's
``4**(k - parent_order)`` cells contiguous -- but chunked by
:func:`level_chunk_parents` parents, so that a coarse level is a few
~4,096-cell chunks rather than thousands of one-value objects. Those chunks
span several parents, so no cell writes them: the flow assembles them after
the cells (:mod:`magg_core.grid.assembly`). The template creates their groups
and coordinates with the child group's, before the commit marker.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.abc.store import Store
from zarr.codecs import BloscCodec
from zarr.core.array_spec import ArrayConfig
from zarr.core.array_spec import ArraySpec as ChunkSpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning
from zarr.storage import LocalStore, ObjectStore

import magg_core
from magg_core.access.s3 import S3Credentials, S3Endpoint, s3_store
from magg_core.config import PipelineConfig, named_ellipsoid
from magg_core.errors import InputError
from magg_core.morton import children, healpix_ids, parent_of
from magg_core.store.fragments import FRAGMENTS_PREFIX
from magg_core.store.objects import REQUESTS_IN_FLIGHT, put_many
from magg_core.store.records import RECORDS_PREFIX
from magg_core.store.staging import LEVELS_PREFIX, clear_staging, staged_orders
from magg_core.urls import URLError, s3_location

__all__ = [
    "ArraySpec",
    "Level",
    "Template",
    "TemplateMismatchError",
    "check_template",
    "chunk_index",
    "consolidate",
    "create_template",
    "level_chunk_parents",
    "open_store",
    "read_template",
    "statistic_arrays",
    "store_levels",
    "write_cell",
]

DIMENSION = "cells"
COORDINATES = ("cell_ids", "morton")
TEMPLATE_ATTR = "magg"
"""Group attribute holding provenance; its presence marks a finished template."""

ZARR_DGGS_CONVENTION = {
    "uuid": "7b255807-140c-42ca-97f6-7a1cfecdbc38",
    "schema_url": (
        "https://raw.githubusercontent.com/zarr-conventions/dggs/refs/tags/v1/schema.json"
    ),
    "spec_url": "https://github.com/zarr-conventions/dggs/blob/v1/README.md",
    "name": "dggs",
    "description": "Discrete Global Grid Systems convention for zarr",
}
"""The declaration of the zarr DGGS convention (v1), as xdggs 0.6 looks it up."""

CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
"""Blosc/zstd with byte shuffle, for every array.

Shuffling groups the bytes of equal significance: the high bytes of uint64
ids and morton words (constant within a parent) and of dense float32 heights
become long runs, so a coordinate chunk shrinks ~90x and a dense statistic
chunk compresses ~20 % better than plain zstd (sparse, mostly-NaN chunks are
within a few percent of it). Blosc is a core zarr v3 codec, so other zarr
implementations read the store too.

Level 1: on a cell's nine statistic chunks (a dense cell, 9 × 16 KB) zstd
level 5 took 6.6 ms and wrote 59.0 KB, level 1 0.9 ms and 60.8 KB (+3 %):
at level 5, compressing was the largest part of a cell's write.
"""

COORDINATE_SHARD_PARENTS = 256
"""Parents per shard of the coordinate arrays.

Coordinates are written once, by the template, so packing many parent chunks
into one object is safe and turns ~2,000 tiny objects per coordinate into a
handful: faster to create on S3 and faster for xdggs, which reads every id.
Statistics are *not* sharded: cells write concurrently, and a shared shard
would make each a read-modify-write of its neighbours' bytes.
"""

TEMPLATE_THREADS = 8
"""Groups, and arrays of a group, created at once by :func:`create_template` (threads
waiting on the store, each request's latency overlapped)."""

WRITE_BLOCK_PARENTS = 2 * COORDINATE_SHARD_PARENTS
"""Parents whose coordinates are computed and written in one bulk write
(whole shards, ~32 MB of uint64), bounding memory for large catalogs."""

LEVEL_CHUNK_CELLS = 4096
"""Cells per chunk that a coarse pyramid level aims at: the child order's
chunk size (one order-12 parent), so every level's chunks are alike -- tens
of kilobytes a statistic, few enough objects that xarray opens a level
quickly. One parent per chunk at order 6 would be one 4-byte object per
parent and statistic (~18,000 for Antarctica)."""


def level_chunk_parents(config: PipelineConfig, order: int) -> int:
    """Parents per chunk of the group of ``order`` (1 for the child order).

    The child order keeps one parent per chunk, whatever its size, because
    each cell writes its own chunk there. A coarser level packs
    ``LEVEL_CHUNK_CELLS // 4**(order - parent_order)`` parents into a chunk
    (4 at order 11, 4,096 at order 6 for the built-in config), at least one.
    """
    if order == config.output.child_order:
        return 1
    return max(1, LEVEL_CHUNK_CELLS // config.output.cells_per_parent(order))


@dataclass(frozen=True)
class ArraySpec:
    """One data array of a store's group: what a cell writes a chunk of.

    A cycle store holds one per statistic of the config
    (:func:`statistic_arrays`); other products built on the same grid and
    chunk layout (height change) pass their own.
    """

    name: str
    dtype: np.dtype
    fill_value: Any
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """Extra array attributes (``units``, ``long_name``), JSON-safe."""


def statistic_arrays(config: PipelineConfig) -> tuple[ArraySpec, ...]:
    """The arrays of a cycle store: one per statistic of the config, in config order."""
    return tuple(
        ArraySpec(stat.name, stat.dtype, stat.fill_value) for stat in config.aggregation.statistics
    )


class TemplateMismatchError(InputError, ValueError):
    """The store's template is missing or differs from what this run expects."""


@dataclass(frozen=True)
class Template:
    """The parts of a finished template that cells are checked against."""

    id: str
    """Unique per creation: a store deleted and re-created gets a new id."""
    config_hash: str
    config: Mapping[str, Any]
    parents: np.ndarray
    """Parent morton words (uint64) in chunk order."""
    arrays: tuple[str, ...]
    """Names of the data arrays, in creation order."""


def open_store(
    url: str,
    *,
    credentials: S3Credentials | None = None,
    endpoint: S3Endpoint | None = None,
    read_only: bool = False,
) -> Store:
    """A zarr store for a local path, a ``file://`` URL or an ``s3://`` URL.

    Parameters
    ----------
    url
        ``/some/dir.zarr``, ``file:///some/dir.zarr`` or ``s3://bucket/prefix.zarr``.
    credentials
        For ``s3://`` only. ``None`` uses the ambient identity (a Lambda or
        ECS task role, ``AWS_*`` variables), which obstore resolves itself.
    endpoint
        For ``s3://`` only; default :meth:`S3Endpoint.from_env`, so
        ``AWS_ENDPOINT_URL_S3`` points a worker at a test or non-AWS server.
    read_only
        Open without write permission (inspection, plotting).

    Raises
    ------
    URLError
        For another scheme, or an ``s3://`` URL :func:`magg_core.urls.parse_s3_url`
        refuses (an invalid bucket name, a port or user info, a query, ``..``
        above the bucket); the message quotes ``url``.
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        location = s3_location(url, "store URL")
        s3 = s3_store(
            location.bucket,
            prefix=location.key or None,
            credentials=credentials,
            endpoint=endpoint or S3Endpoint.from_env(),
        )
        return ObjectStore(s3, read_only=read_only)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)), read_only=read_only)
    if parsed.scheme == "":
        return LocalStore(Path(url), read_only=read_only)
    raise URLError(f"unsupported store URL {url!r} (use a path, file:// or s3://)")


def create_template(
    store: Store,
    config: PipelineConfig,
    parents: Sequence[int] | np.ndarray,
    provenance: Mapping[str, Any],
    *,
    arrays: Sequence[ArraySpec] | None = None,
) -> None:
    """Create the arrays and coordinates of every parent cell, once.

    Parameters
    ----------
    store
        From :func:`open_store`.
    config
        Decides the group (``child_order``), the statistics and their dtypes.
    parents
        Parent morton words at ``parent_order``, strictly ascending (the
        catalog's order, which becomes the chunk order).
    provenance
        JSON-safe extra provenance, e.g. the catalog's ``metadata``.
    arrays
        The data arrays; default :func:`statistic_arrays` of ``config``. Only
        that default gets the coarse pyramid levels of ``output.levels`` (a
        group per order, with the same arrays); a product passing its own
        arrays has the child order's group alone.

    Raises
    ------
    TemplateMismatchError
        If a finished template with another config, parent list or set of
        arrays exists;
        nothing is written. The same config and parents make this a no-op.
    ValueError
        If ``parents`` are not unique ascending words of ``parent_order``.
    """
    levels = staged_orders(config) if arrays is None else ()
    provenance = json.loads(json.dumps(dict(provenance), allow_nan=False))  # fail before writing
    if matching_template(store, config, parents, arrays=arrays) is not None:
        return
    words = _validate_parents(parents, config)
    arrays = tuple(statistic_arrays(config) if arrays is None else arrays)

    root = zarr.open_group(store, mode="a", zarr_format=3)
    # overwrite=True clears an unfinished try, the child group first so that a
    # crash from here on leaves no commit marker.
    group = root.create_group(_group_path(config), overwrite=True)
    level_groups = {k: root.create_group(str(k), overwrite=True) for k in levels}
    if levels:  # a new template: no cell has run for it, whatever an old one left
        clear_staging(store, config)

    def fill(order: int, target: zarr.Group) -> None:
        _create_arrays(target, config, order, words.size, arrays)
        _write_coordinates(target, config, words, order)

    # Orders and arrays are independent objects: created at once, a template
    # costs a few request latencies on S3 rather than ~400 in a row (12 s at 30 ms).
    with ThreadPoolExecutor(TEMPLATE_THREADS) as pool:
        groups = [*level_groups.items(), (config.output.child_order, group)]
        list(pool.map(lambda item: fill(*item), groups))
        list(
            pool.map(
                lambda item: item[1].update_attributes(_dggs_attributes(config, item[0])),
                level_groups.items(),
            )
        )
    group.update_attributes(
        _group_attributes(config, words, provenance, arrays)
    )  # the commit marker, last


def matching_template(
    store: Store,
    config: PipelineConfig,
    parents: Sequence[int] | np.ndarray,
    *,
    arrays: Sequence[ArraySpec] | None = None,
) -> Template | None:
    """The store's finished template if it is the one :func:`create_template` would make.

    Read-only (one GET), so a run can refuse another run's store before it
    writes anything there, also what it writes beside the template
    (fragments).

    Returns
    -------
    Template or None
        ``None`` if the store has no finished template of ``config``'s group.

    Raises
    ------
    TemplateMismatchError
        If a finished template with another config, parent list or set of
        arrays exists.
    ValueError
        If ``parents`` are not unique ascending words of ``parent_order``.
    """
    words = _validate_parents(parents, config)
    existing = read_template(store, config)
    if existing is not None:
        specs = tuple(statistic_arrays(config) if arrays is None else arrays)
        _require_same(existing, config, words, specs)
    return existing


def read_template(store: Store, config: PipelineConfig) -> Template | None:
    """The finished template of ``config``'s group, or ``None`` if there is none.

    One GET of the group's ``zarr.json``; parsed once per distinct document
    in a process (:func:`_parse_template`), since every cell checks the same
    template. The returned parents are read-only: the object is shared.
    """
    key = f"{_group_path(config)}/zarr.json"
    try:
        document = sync(store.get(key, default_buffer_prototype()))
    except FileNotFoundError:  # a read-only local store whose directory does not exist yet
        return None
    return None if document is None else _parse_template(document.to_bytes())


@functools.lru_cache(maxsize=16)
def _parse_template(document: bytes) -> Template | None:
    metadata = json.loads(document)
    marker = metadata.get("attributes", {}).get(TEMPLATE_ATTR)
    if metadata.get("node_type") != "group" or not isinstance(marker, Mapping):
        return None
    parents = np.array([int(p) for p in marker["parents"]], dtype=np.uint64)
    parents.setflags(write=False)
    return Template(
        id=marker["id"],
        config_hash=marker["config_hash"],
        config=marker["config"],
        parents=parents,
        arrays=tuple(marker.get("arrays", ())),
    )


@dataclass(frozen=True)
class Level:
    """One pyramid level as the store holds it (read from its ``cell_ids`` array)."""

    order: int
    cells: int
    """Cells of the level: parents × ``4**(order - parent_order)``."""
    chunk_cells: int
    """Cells per chunk of its arrays."""

    @property
    def chunks(self) -> int:
        return -(-self.cells // self.chunk_cells)


def store_levels(store: Store, config: PipelineConfig) -> list[Level]:
    """The levels of ``config`` that have a group in the store, ascending by order."""
    levels = []
    for order in config.output.orders:
        try:
            ids = zarr.open_array(store, path=f"{order}/cell_ids", mode="r", zarr_format=3)
        except FileNotFoundError:  # zarr's NodeNotFoundError: a level this store lacks
            continue
        levels.append(Level(order=order, cells=ids.shape[0], chunk_cells=ids.chunks[0]))
    return levels


def chunk_index(store: Store, config: PipelineConfig, parent_morton: int) -> int:
    """Position of a parent cell's chunk in the store.

    Read from the parent list stored with the template: one small metadata
    read, where scanning the ``morton`` array would read every chunk.

    Raises
    ------
    TemplateMismatchError
        If there is no template or the parent is not in it.
    """
    template = _require_template(store, config)
    word = np.uint64(parent_morton)
    index = int(np.searchsorted(template.parents, word))
    if index == template.parents.size or template.parents[index] != word:
        raise TemplateMismatchError(
            f"parent cell {parent_morton} is not in the store's template "
            f"({template.parents.size} parents)"
        )
    return index


def check_template(
    store: Store, config: PipelineConfig, parent_morton: int, chunk_idx: int
) -> Template:
    """The store's template, if it is this config's with ``parent_morton`` at ``chunk_idx``.

    Cells call this before any work, so a worker given a stale store, a
    different config or a wrong chunk index stops before it could overwrite
    another cell's chunk; they hand the template to :func:`write_cell`.

    Raises
    ------
    TemplateMismatchError
        Saying what differs, if there is no template or it does not match.
    """
    template = _require_template(store, config)
    if template.config_hash != config.hash:
        raise TemplateMismatchError(_config_difference(template, config))
    n = template.parents.size
    if not 0 <= chunk_idx < n:
        raise TemplateMismatchError(
            f"chunk index {chunk_idx} is outside the template's {n} parents"
        )
    stored = int(template.parents[chunk_idx])
    if stored != parent_morton:
        raise TemplateMismatchError(
            f"chunk {chunk_idx} of the store holds parent cell {stored}, not {parent_morton}"
        )
    return template


def write_cell(
    store: Store,
    config: PipelineConfig,
    chunk_idx: int,
    stats: Mapping[str, np.ndarray],
    *,
    arrays: Sequence[ArraySpec] | None = None,
    objects: Mapping[str, bytes | None] | None = None,
    template: Template | None = None,
) -> dict[str, str | None]:
    """Write one parent's chunk of every data array (``arrays``, default the statistics).

    Returns every store key written or removed → the SHA-256 (hex) of the
    bytes put, ``None`` for a removed object: the chunks (one per array) and
    ``objects``. The cell's record keeps them
    (:attr:`magg_core.store.records.CellRecord.outputs`) and a later run compares
    them with what the store then holds (:func:`magg_core.store.records.proven_cells`).

    Everything is validated before the first byte is written, so a bad call
    leaves the store as it was. A chunk that is all fill values is removed
    rather than written (zarr's default), so re-running a cell that lost its
    data also clears what an earlier run wrote.

    ``objects`` are other objects of the same cell (store key → bytes to
    put, or ``None`` to delete), written together with the chunks: the
    pyramid levels' staging object (:func:`magg_core.store.staging.staging_object`).

    ``template``: the store's template as the caller checked it
    (:func:`check_template`). With it, the arrays' metadata is read once per
    process and template -- arrays are created with their template and never
    change under its id, which is new for every creation -- and a cell's
    write is one round of requests instead of two.

    Each chunk is encoded by the codecs its array's metadata declares (zarr's
    own codec objects, :func:`_encode_chunk`) and put as one object, rather
    than through ``zarr.Array.__setitem__``: that route costs ~1.5 ms of
    zarr's per-array machinery a chunk (indexing, a codec pipeline, one
    thread hop per codec), ~14 ms a cell for nine 16 KB chunks, more than
    encoding them. The bytes are the same (tests/store/test_store.py compares them
    with zarr's). On S3 the write is two round trips whatever the number of
    arrays: every array's metadata is read at once (each by its own path,
    not through the group, whose metadata holds the whole template), then
    every chunk and object is put at once.

    Raises
    ------
    ValueError
        If the names differ from the arrays' (the config's statistics), or an array has
        another dtype or length than its chunk, or ``chunk_idx`` is outside
        the store's arrays, or the store lacks an array.
    """
    per_parent = config.output.children_per_parent
    specs = statistic_arrays(config) if arrays is None else arrays
    expected = {spec.name: spec.dtype for spec in specs}
    missing = sorted(set(expected) - set(stats))
    unknown = sorted(set(stats) - set(expected))
    if missing or unknown:
        raise ValueError(f"arrays do not match the store's: missing {missing}, unknown {unknown}")
    for name, dtype in expected.items():
        values = stats[name]
        if not (
            isinstance(values, np.ndarray)
            and values.dtype == dtype
            and values.shape == (per_parent,)
        ):
            got_dtype = getattr(values, "dtype", type(values).__name__)
            raise ValueError(
                f"statistic {name!r}: expected dtype {dtype} and shape ({per_parent},), "
                f"got dtype {got_dtype} and shape {getattr(values, 'shape', None)}"
            )
    path = _group_path(config)
    return sync(_write_chunks(store, path, chunk_idx, per_parent, stats, template, objects or {}))


async def arrays_metadata(
    store: Store, path: str, names: Sequence[str], template: Template | None = None
) -> dict[str, ArrayV3Metadata]:
    """The metadata of the arrays ``names`` of the group at ``path``: from
    :data:`_TEMPLATE_ARRAYS` when ``template`` is given and they were read
    under it, else read at once (one round of GETs).

    Raises
    ------
    ValueError
        If the store has no array of one of ``names`` there.
    """
    known = _TEMPLATE_ARRAYS.get(template.id, {}) if template is not None else {}
    missing = [name for name in names if (path, name) not in known]
    prototype = default_buffer_prototype()
    documents = await asyncio.gather(
        *(store.get(f"{path}/{name}/zarr.json", prototype) for name in missing)
    )
    read = {}
    for name, document in zip(missing, documents, strict=True):
        if document is None:
            raise ValueError(f"the store has no array {path}/{name}")
        read[(path, name)] = ArrayV3Metadata.from_dict(json.loads(document.to_bytes()))
    if template is not None and read:
        if len(_TEMPLATE_ARRAYS) >= 16:  # a process sees few stores; bound it anyway
            _TEMPLATE_ARRAYS.clear()
        _TEMPLATE_ARRAYS.setdefault(template.id, {}).update(read)
    every = {**known, **read}
    return {name: every[(path, name)] for name in names}


_TEMPLATE_ARRAYS: dict[str, dict[tuple[str, str], ArrayV3Metadata]] = {}
"""Template id → (group path, array name) → the array's metadata, as read under it."""


async def _write_chunks(
    store: Store,
    path: str,
    chunk_idx: int,
    per_parent: int,
    stats: Mapping[str, np.ndarray],
    template: Template | None,
    objects: Mapping[str, bytes | None],
) -> dict[str, str | None]:
    metadata = await arrays_metadata(store, path, tuple(stats), template)
    chunks: dict[str, bytes | None] = {}
    for name, values in stats.items():
        array = metadata[name]
        if array.chunks != (per_parent,):
            raise ValueError(
                f"array {path}/{name} has chunks of {array.chunks}, not one parent's "
                f"{per_parent} cells"
            )
        n_chunks = array.shape[0] // per_parent
        if not 0 <= chunk_idx < n_chunks:
            raise ValueError(f"chunk index {chunk_idx} is outside the store's {n_chunks} chunks")
        chunks |= await chunk_objects(array, f"{path}/{name}", chunk_idx, values)
    written = {**chunks, **objects}
    await put_many(store, written)
    return {
        key: None if data is None else hashlib.sha256(data).hexdigest()
        for key, data in written.items()
    }


async def chunk_objects(
    array: ArrayV3Metadata, path: str, first_chunk: int, values: np.ndarray
) -> dict[str, bytes | None]:
    """``values`` as the objects of whole chunks of the 1-D array at ``path``, from chunk
    ``first_chunk`` on: store key → bytes, ``None`` for a chunk of fill values alone
    (removed, zarr's default).

    ``values`` covers whole chunks, except that it may end at the array's end: that
    edge chunk is padded with the fill value, as zarr stores it (the Zarr v3 spec's
    regular chunk grid: every chunk has the grid's shape). The bytes are zarr's own
    for the same values (tests/grid/test_levels.py compares them), through
    :func:`_encode_chunk`, without zarr's per-chunk machinery (~1.5 ms a chunk).

    Raises
    ------
    ValueError
        If ``values`` starts or ends inside a chunk, or beyond the array.
    """
    (size,) = array.chunks
    start, end = first_chunk * size, first_chunk * size + values.shape[0]
    if not 0 <= start <= end <= array.shape[0] or (end % size and end != array.shape[0]):
        raise ValueError(
            f"cells {start}:{end} of {path} are not whole chunks of {size} cells "
            f"within its {array.shape[0]}"
        )
    objects = {}
    for j, lo in enumerate(range(0, values.shape[0], size)):
        block = values[lo : lo + size]
        if block.shape[0] < size:
            padding = np.full(size - block.shape[0], array.fill_value, dtype=block.dtype)
            block = np.concatenate([block, padding])
        key = f"{path}/{array.encode_chunk_key((first_chunk + j,))}"
        objects[key] = await _encode_chunk(array, block)
    return objects


async def _encode_chunk(metadata: ArrayV3Metadata, values: np.ndarray) -> bytes | None:
    """A whole chunk's bytes as zarr stores them, or ``None`` if it is all fill values."""
    fill = np.asarray(metadata.fill_value, dtype=values.dtype)
    nan_equal = values.dtype.kind == "f"
    if np.array_equal(values, np.broadcast_to(fill, values.shape), equal_nan=nan_equal):
        return None
    prototype = default_buffer_prototype()
    spec = ChunkSpec(
        shape=values.shape,
        dtype=metadata.data_type,
        fill_value=metadata.fill_value,
        config=ArrayConfig.from_dict({}),
        prototype=prototype,
    )
    data = prototype.nd_buffer.from_numpy_array(values)
    for codec in metadata.codecs:
        (data,) = await codec.encode([(data, spec)])
        spec = codec.resolve_metadata(spec)
    return data.to_bytes()


def consolidate(store: Store) -> None:
    """Consolidate the store's metadata so xarray opens it with one read.

    Run it once, after the cells: consolidated metadata is a snapshot. The
    ``records/``, ``fragments/`` and ``levels/`` prefixes are not zarr nodes, which zarr
    reports with a warning
    while it walks the hierarchy; that warning, and zarr's note that
    consolidated metadata is not yet part of the v3 spec, are expected here
    and silenced (``warnings.catch_warnings`` is process-wide, so other
    threads' warnings of the same text are silenced meanwhile too).

    zarr walks the hierarchy with its ``async.concurrency`` requests in flight
    (10 by default); with :data:`~magg_core.store.objects.REQUESTS_IN_FLIGHT`,
    a store of seven levels behind 30 ms of latency consolidates in 0.78 s
    instead of 0.97 s (docs/performance.md §16). That setting is process-wide
    too, for the duration of the walk.
    """
    with warnings.catch_warnings(), zarr.config.set({"async.concurrency": REQUESTS_IN_FLIGHT}):
        for prefix in (RECORDS_PREFIX, FRAGMENTS_PREFIX, LEVELS_PREFIX):
            warnings.filterwarnings(
                "ignore", message=f"Object at {prefix} is not recognized", category=ZarrUserWarning
            )
        warnings.filterwarnings(
            "ignore",
            message="Consolidated metadata is currently not part",
            category=ZarrUserWarning,
        )
        zarr.consolidate_metadata(store)


def _group_path(config: PipelineConfig) -> str:
    return str(config.output.child_order)


def _require_template(store: Store, config: PipelineConfig) -> Template:
    template = read_template(store, config)
    if template is None:
        raise TemplateMismatchError(
            f"the store has no finished template for order {config.output.child_order} "
            f"(group /{_group_path(config)}/); create it before running cells"
        )
    return template


def _validate_parents(parents: Sequence[int] | np.ndarray, config: PipelineConfig) -> np.ndarray:
    words = np.array([int(p) for p in parents], dtype=np.uint64)
    if words.size == 0:
        raise ValueError("a template needs at least one parent cell")
    if np.any(words[1:] <= words[:-1]):
        raise ValueError("parent cells must be unique and in ascending morton order")
    wrong = words[parent_of(words, config.output.parent_order) != words]
    if wrong.size:
        raise ValueError(
            f"{wrong.size} parent word(s) are not at order {config.output.parent_order}, "
            f"e.g. {int(wrong[0])}"
        )
    return words


def _require_same(
    template: Template, config: PipelineConfig, words: np.ndarray, arrays: Sequence[ArraySpec]
) -> None:
    if template.config_hash != config.hash:
        raise TemplateMismatchError(_config_difference(template, config))
    names = tuple(spec.name for spec in arrays)
    if template.arrays != names:
        raise TemplateMismatchError(
            f"the store's template has arrays {list(template.arrays)}, this run {list(names)}"
        )
    if not np.array_equal(template.parents, words):
        raise TemplateMismatchError(_parents_difference(template.parents, words))


def _config_difference(template: Template, config: PipelineConfig) -> str:
    paths = list(_differing_paths(template.config, config.to_dict(), ""))
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return (
        f"the store's template was made with config {template.config_hash}, "
        f"this run uses {config.hash}; they differ at {shown or 'an unknown key'}"
    )


def _differing_paths(old: Any, new: Any, path: str) -> Iterator[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            key_path = f"{path}.{key}" if path else str(key)
            yield from _differing_paths(old.get(key), new.get(key), key_path)
    elif old != new:
        yield path or "(top level)"


def _parents_difference(stored: np.ndarray, wanted: np.ndarray) -> str:
    n = min(stored.size, wanted.size)
    unequal = np.flatnonzero(stored[:n] != wanted[:n])
    where = int(unequal[0]) if unequal.size else n
    first = (
        f"first difference at position {where}: store {int(stored[where])}, "
        f"this run {int(wanted[where])}"
        if where < n
        else f"one list extends the other after position {n - 1}"
    )
    return f"the store's template has {stored.size} parent cells, this run {wanted.size}; {first}"


def _create_arrays(
    group: zarr.Group,
    config: PipelineConfig,
    order: int,
    n_parents: int,
    arrays: Sequence[ArraySpec],
) -> None:
    """The coordinates and data arrays of the group of ``order``.

    Coordinates are sharded by :data:`COORDINATE_SHARD_PARENTS` parents
    unless a chunk already holds that many (coarse levels); at the child order
    this is the layout the store always had.
    """
    per_parent = config.output.cells_per_parent(order)
    chunk_parents = level_chunk_parents(config, order)
    chunk = per_parent * chunk_parents
    shards = (
        (per_parent * COORDINATE_SHARD_PARENTS,)
        if chunk_parents < COORDINATE_SHARD_PARENTS
        and COORDINATE_SHARD_PARENTS % chunk_parents == 0
        else None
    )
    coordinates = [ArraySpec(name, config.aggregation.coordinates[name], 0) for name in COORDINATES]

    def create(spec: ArraySpec) -> None:
        coordinate = spec.name in COORDINATES
        group.create_array(
            spec.name,
            shape=(n_parents * per_parent,),
            dtype=spec.dtype,
            chunks=(chunk,),
            shards=shards if coordinate else None,
            compressors=CODEC,
            fill_value=spec.fill_value,
            dimension_names=(DIMENSION,),
            attributes={**_array_attributes(spec.name, config, order), **spec.attributes},
        )

    with ThreadPoolExecutor(TEMPLATE_THREADS) as pool:
        list(pool.map(create, [*coordinates, *arrays]))


def _array_attributes(name: str, config: PipelineConfig, order: int) -> dict[str, Any]:
    out = config.output
    if name == "cell_ids":
        return {
            "grid_name": out.grid,
            "level": order,
            "indexing_scheme": out.indexing_scheme,
            "ellipsoid": out.ellipsoid_parameters,
        }
    if name == "morton":
        return {"long_name": f"morton word of the order-{order} cell (mortie)"}
    return {"coordinates": " ".join(COORDINATES)}


def _write_coordinates(
    group: zarr.Group, config: PipelineConfig, words: np.ndarray, order: int
) -> None:
    """Every parent's cells at ``order``, written in blocks of whole chunks (and shards)."""
    per_parent = config.output.cells_per_parent(order)
    chunk_parents = level_chunk_parents(config, order)
    block_parents = chunk_parents * max(1, WRITE_BLOCK_PARENTS // chunk_parents)
    morton_array, ids_array = group["morton"], group["cell_ids"]
    for start in range(0, words.size, block_parents):
        block = words[start : start + block_parents]
        morton = np.concatenate([children(int(p), order) for p in block])
        cells = slice(start * per_parent, (start + block.size) * per_parent)
        morton_array[cells] = morton
        ids_array[cells] = healpix_ids(morton)


def _group_attributes(
    config: PipelineConfig,
    words: np.ndarray,
    provenance: Mapping[str, Any],
    arrays: Sequence[ArraySpec],
) -> dict[str, Any]:
    out = config.output
    return {
        **_dggs_attributes(config, out.child_order),
        TEMPLATE_ATTR: {
            "id": uuid.uuid4().hex,
            "version": magg_core.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config_hash": config.hash,
            "config": config.to_dict(),
            "parent_order": out.parent_order,
            "child_order": out.child_order,
            "n_parents": int(words.size),
            "parents": [str(p) for p in words.tolist()],
            "arrays": [spec.name for spec in arrays],
            "provenance": provenance,
        },
    }


def _dggs_attributes(config: PipelineConfig, order: int) -> dict[str, Any]:
    """The zarr DGGS convention's group attributes for the group of ``order``."""
    out = config.output
    return {
        "zarr_conventions": [ZARR_DGGS_CONVENTION],
        "dggs": {
            "name": out.grid,
            "refinement_level": order,
            "indexing_scheme": out.indexing_scheme,
            "ellipsoid": out.ellipsoid_parameters,
            "coordinate": "cell_ids",
            "spatial_dimension": DIMENSION,
            "compression": "none",
        },
    }


def current_dggs_attributes(
    group_attrs: Mapping[str, Any], cell_ids_attrs: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A level's DGGS attributes (the group's ``dggs``, ``cell_ids``'s own) as written today.

    magg before 0.2 wrote ``ellipsoid`` as a bare name (``"WGS84"``); the zarr
    DGGS convention's decoder in xdggs 0.7 needs the object form, which 0.6
    reads too. Returns the two mappings with a bare name replaced by
    :func:`~magg_core.config.named_ellipsoid`; the other keys are unchanged.
    """

    def upgraded(attrs: Mapping[str, Any]) -> dict[str, Any]:
        ellipsoid = attrs.get("ellipsoid")
        return (
            {**attrs, "ellipsoid": named_ellipsoid(ellipsoid)}
            if isinstance(ellipsoid, str)
            else dict(attrs)
        )

    group = dict(group_attrs)
    if isinstance(group.get("dggs"), Mapping):
        group["dggs"] = upgraded(group["dggs"])
    return group, upgraded(cell_ids_attrs)


def upgrade_dggs_attributes(store: Store) -> list[str]:
    """Rewrite every level's DGGS attributes in place as :func:`current_dggs_attributes`.

    For stores written by magg before 0.2, so that readers other than
    ``magg.open`` (``xdggs.decode`` on xdggs 0.7) decode them. Only attributes
    change, never array bytes; re-consolidates the metadata. Idempotent.
    Returns the groups rewritten (``["6", …, "12"]``; ``[]`` when already current).
    """
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    with warnings.catch_warnings():  # records/, levels/, fragments/ are not zarr nodes
        warnings.simplefilter("ignore", ZarrUserWarning)
        groups = sorted(root.groups())
    changed = []
    for name, group in groups:
        if "cell_ids" not in group:
            continue
        cell_ids = group["cell_ids"]
        new_group, new_cell_ids = current_dggs_attributes(
            group.attrs.asdict(), cell_ids.attrs.asdict()
        )
        if new_group == group.attrs.asdict() and new_cell_ids == cell_ids.attrs.asdict():
            continue
        cell_ids.attrs.update(new_cell_ids)
        group.attrs.update(new_group)
        changed.append(name)
    if changed:
        consolidate(store)
    return changed
