"""Fragments: one granule's points in one parent cell, kept between the extract and grid stages.

A cycle is gridded in two stages so that each granule is read once however
many cells it crosses (an Antarctic granule crosses 25-32 order-6 parents):

- *extract*, per granule: read it once for every parent the catalog lists it
  under (:func:`magg_core.granules.read.read_parents`) and store one fragment per
  (granule, parent), then the granule's extract record;
- *grid*, per parent: fetch the parent's fragment of each of its granules
  (one request each) and aggregate.

Layout, under the output store (beside the ``records/`` of the cells)::

    fragments/{child_order}/{granule name}/{parent morton}.npz
    fragments/{child_order}/{granule name}/extract.json

A fragment is an uncompressed ``.npz`` (numpy's zip of ``.npy`` arrays, read
with ``allow_pickle=False``): ``child`` -- the point's child position in the
parent, ``uint16`` while a parent has at most 65,536 children (4,096 for
orders 6 → 12) -- and each ``data_source`` variable in the file's dtype, in
the granule's beam-then-row order. For ATL06 that is 2 + 4 + 4 = 10 bytes a
point. Beside them, one int64 scalar per reason the reader left a point of
the parent out (``dropped.quality``, ``dropped.fill``: see
:data:`magg_core.granules.read.READ_DROPS`), so the cell can count what its granules
did not give it; the dot keeps these names apart from any variable's, which
are identifiers. A run that keeps its fragments for height change (``magg run
--keep-fragments`` with a config that has a ``height_change`` section,
:attr:`magg_core.schema.ExtractRequest.height_change`) adds each point's
``latitude``, ``longitude`` and ``time`` (float64 each): 34 bytes a point, what
fitting height change across cycles needs (:mod:`magg_core.height_change.cell`).
Other runs leave them out: the cells use only the variables. The extract
record lists the columns its fragments carry.
Every parent the catalog lists for the granule gets a fragment, empty
if no good point falls in it, so a missing fragment always means the extract
did not succeed; the record, written last, says why.

Writing the same granule again overwrites the same objects (idempotent);
each object is one PUT, which S3 applies atomically.
"""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from zarr.abc.store import Store
from zarr.core.sync import sync

from magg_core.config import PipelineConfig
from magg_core.schema import READ_DROPS, GranuleFailure, GranulePoints
from magg_core.store.objects import (
    REQUESTS_IN_FLIGHT,
    delete_prefix,
    get_many,
    get_one,
    put_many,
)
from magg_core.urls import granule_name

FRAGMENTS_PREFIX = "fragments"
RECORD_NAME = "extract.json"

ExtractStatus = Literal["ok", "failed"]


@dataclass(frozen=True)
class ExtractRecord:
    """What the extract stage did with one granule."""

    url: str
    status: ExtractStatus
    fingerprint: str
    """:func:`magg_core.extract.granule.extract_fingerprint`: granule, config, magg version."""
    points: Mapping[str, int] = field(default_factory=dict)
    """Parent morton word (decimal string, as JSON keeps uint64 exact) → good points."""
    reason: str | None = None
    bytes_fetched: int = 0
    columns: Sequence[str] = ()
    """The point columns each fragment carries besides ``child`` (empty: none written)."""
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Parent morton word → bytes of its fragment as written: what lets the record
    prove its fragments are still there (:func:`fragments_intact`). Empty in
    records written before sizes were kept, which prove nothing."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExtractRecord:
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def encode(points: GranulePoints, config: PipelineConfig) -> bytes:
    """A fragment's bytes: ``child`` plus the config's variables (see the module docstring)."""
    n_children = config.output.children_per_parent
    child_dtype = np.uint16 if n_children <= 2**16 else np.uint32
    buffer = io.BytesIO()
    arrays = {name: np.asarray(points.columns[name]) for name in config.point_columns}
    dropped = {_dropped_key(r): np.int64(points.dropped.get(r, 0)) for r in READ_DROPS}
    np.savez(buffer, child=points.child_index.astype(child_dtype), **arrays, **dropped)
    return buffer.getvalue()


def _dropped_key(reason: str) -> str:
    return f"dropped.{reason}"


def decode(
    data: bytes, url: str, config: PipelineConfig, columns: Sequence[str] | None = None
) -> GranulePoints:
    """The points a fragment holds: ``child`` and ``columns`` (default: the config's
    variables, all a cell aggregates; height change asks for ``config.point_columns``).

    Raises
    ------
    ValueError
        If the bytes are not a fragment of this config (an array or a dropped
        count is missing, lengths differ, or it would need unpickling).
    """
    if columns is None:
        columns = config.data_source.variables
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        names = ("child", *columns)
        counted = tuple(_dropped_key(r) for r in READ_DROPS)
        missing = [n for n in (*names, *counted) if n not in npz.files]
        if missing:
            raise ValueError(f"fragment of {granule_name(url)} lacks {missing}")
        arrays = {name: npz[name] for name in names}
        dropped = {r: npz[_dropped_key(r)] for r in READ_DROPS}
    if len({a.shape for a in arrays.values()}) != 1:
        raise ValueError(f"fragment of {granule_name(url)} has arrays of different lengths")
    if any(v.shape != () or v.dtype.kind not in "iu" or v < 0 for v in dropped.values()):
        raise ValueError(f"fragment of {granule_name(url)} has invalid dropped counts")
    child = arrays.pop("child").astype(np.int64)
    counts = {reason: int(value) for reason, value in dropped.items()}
    return GranulePoints(url=url, child_index=child, columns=arrays, dropped=counts)


def fragment_key(config: PipelineConfig, url: str, parent_morton: int) -> str:
    return f"{_prefix(config, url)}{int(parent_morton)}.npz"


def record_key(config: PipelineConfig, url: str) -> str:
    return f"{_prefix(config, url)}{RECORD_NAME}"


def write_fragments(
    store: Store, config: PipelineConfig, url: str, points: Mapping[int, GranulePoints]
) -> dict[str, int]:
    """Store one fragment per parent; returns each parent's fragment size in bytes
    (keyed by the decimal morton word, as :attr:`ExtractRecord.sizes`)."""
    blobs = {p: encode(pts, config) for p, pts in points.items()}
    sync(put_many(store, {fragment_key(config, url, p): b for p, b in blobs.items()}))
    return {str(p): len(b) for p, b in blobs.items()}


def fragments_intact(
    store: Store, config: PipelineConfig, record: ExtractRecord, parents: Sequence[int]
) -> bool:
    """Whether the fragments ``record`` lists for ``parents`` are in the store at their size.

    A size check (one HEAD each, concurrent), not a read: proving a
    granule's extract must cost far less than the extract. A fragment whose
    bytes changed at the same size is caught where it is read, by the CRC-32
    numpy's zip keeps of each array (:func:`read_cell_fragments`).
    """
    wanted = [str(p) for p in parents]
    if not all(p in record.sizes for p in wanted):
        return False
    keys = [fragment_key(config, record.url, int(p)) for p in wanted]
    sizes = sync(_sizes(store, keys))
    return sizes == [record.sizes[p] for p in wanted]


def write_extract_record(store: Store, config: PipelineConfig, record: ExtractRecord) -> None:
    sync(put_many(store, {record_key(config, record.url): record.to_json()}))


def read_extract_record(store: Store, config: PipelineConfig, url: str) -> ExtractRecord | None:
    data = sync(get_one(store, record_key(config, url)))
    return None if data is None else ExtractRecord.from_json(data)


def read_extract_records(store: Store, config: PipelineConfig) -> list[ExtractRecord]:
    """Every extract record of the config's child order (one listing, then concurrent GETs)."""
    return sync(_read_records(store, f"{FRAGMENTS_PREFIX}/{config.output.child_order}/"))


async def _read_records(store: Store, prefix: str) -> list[ExtractRecord]:
    keys = [k async for k in store.list_prefix(prefix) if k.endswith(f"/{RECORD_NAME}")]
    return [ExtractRecord.from_json(b) for b in await get_many(store, keys) if b is not None]


def read_cell_fragments(
    store: Store,
    config: PipelineConfig,
    urls: Sequence[str],
    parent_morton: int,
    columns: Sequence[str] | None = None,
) -> tuple[list[GranulePoints], list[GranuleFailure]]:
    """The parent's fragment of each granule (``columns`` as :func:`decode` takes them),
    fetched concurrently, in the order of ``urls``.

    A granule without a fragment is a failure: its extract failed (the
    record's reason) or never ran. So is a fragment that cannot be decoded
    (its CRC-32 or layout does not check out), which is removed: the next
    run extracts that granule again.
    """
    keys = [fragment_key(config, url, parent_morton) for url in urls]
    blobs = sync(get_many(store, keys))
    points, failures = [], []
    for url, key, data in zip(urls, keys, blobs, strict=True):
        if data is not None:
            try:
                points.append(decode(data, url, config, columns))
            except (ValueError, zipfile.BadZipFile, EOFError) as exc:
                # Removed, so that the granule's record no longer proves its
                # extract and the next run extracts it again.
                if not store.read_only:
                    sync(store.delete(key))
                reason = f"its fragment for this cell is unreadable ({exc}); extract it again"
                failures.append(GranuleFailure(url=url, reason=reason))
            continue
        record = read_extract_record(store, config, url)
        if record is not None and record.status == "failed":
            failures.append(GranuleFailure(url=url, reason=record.reason or "extract failed"))
        else:
            failures.append(GranuleFailure(url=url, reason="granule was not extracted"))
    return points, failures


def delete_fragments(store: Store, config: PipelineConfig) -> None:
    """Remove every fragment and extract record of the config's child order."""
    delete_prefix(store, f"{FRAGMENTS_PREFIX}/{config.output.child_order}")


def _prefix(config: PipelineConfig, url: str) -> str:
    return f"{FRAGMENTS_PREFIX}/{config.output.child_order}/{granule_name(url)}/"


async def _sizes(store: Store, keys: Sequence[str]) -> list[int | None]:
    limit = asyncio.Semaphore(REQUESTS_IN_FLIGHT)

    async def size(key: str) -> int | None:
        async with limit:
            try:
                return await store.getsize(key)
            except FileNotFoundError:
                return None

    return await asyncio.gather(*(size(key) for key in keys))
