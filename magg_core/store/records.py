"""Durable per-cell records, kept in the store beside the arrays.

Each processed parent cell leaves one small JSON object,
``records/{child_order}/{parent_morton}.json``: its :class:`CellResult` and an
input fingerprint. ``magg inspect`` and a resumed run read them to learn what
is done (and with which inputs) without the Prefect database, which may be
gone or belong to another machine.

They sit at the store's root rather than inside the ``/{child_order}/`` group
so that xarray, which lists that group when metadata is not consolidated,
never sees them. They are plain objects, not zarr nodes: zarr ignores them
(with a warning when it lists the root), and consolidated metadata does not
grow by one entry per cell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from magg_core.config import PipelineConfig
from magg_core.schema import CellResult
from magg_core.store.objects import get_many
from magg_core.urls import granule_name

RECORDS_PREFIX = "records"


@dataclass(frozen=True)
class CellRecord:
    """What one run of one parent cell did, and from which inputs."""

    result: CellResult
    fingerprint: str
    """:func:`input_fingerprint` of the granules, config and magg version used."""
    written_at: str
    """UTC ISO-8601 time the record was written."""
    outputs: Mapping[str, str | None] = field(default_factory=dict)
    """Every store object the cell owns (its chunk of each array, its coarse levels'
    staging object) → the SHA-256 of its bytes as written, ``None`` for one it
    removed (all fill values, no data). Empty when the cell wrote nothing, and in
    records written before outputs were listed: such a record proves no output
    (:func:`proven_cells`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result.to_dict(),
            "fingerprint": self.fingerprint,
            "written_at": self.written_at,
            "outputs": dict(self.outputs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellRecord:
        return cls(
            result=CellResult.from_dict(data["result"]),
            fingerprint=data["fingerprint"],
            written_at=data["written_at"],
            outputs=dict(data.get("outputs", {})),
        )


def input_fingerprint(granule_urls: Iterable[str], config_hash: str, magg_version: str) -> str:
    """A hash of everything a cell's output depends on.

    The granules are a *set* of file names: the catalog may list them in any
    order, and NSIDC's bucket or a mirror holding copies serve the same
    files, so the same inputs give the same fingerprint -- which is how a
    resumed run skips cells whose inputs did not change, and how the watcher
    finds the cells a late granule touches. The names are
    :func:`magg_core.urls.granule_name`'s.

    Raises
    ------
    URLError
        If a URL names no file (empty, or ends in ``/``).
    """
    names = {granule_name(url) for url in granule_urls}
    canonical = json.dumps(
        {"granules": sorted(names), "config": config_hash, "magg": magg_version},
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_record(store: Store, config: PipelineConfig, record: CellRecord) -> None:
    """Store (or replace) the record of ``record.result.parent_morton``."""
    body = json.dumps(record.to_dict(), sort_keys=True).encode()
    buffer = default_buffer_prototype().buffer.from_bytes(body)
    sync(store.set(_key(config, record.result.parent_morton), buffer))


def read_records(
    store: Store, config: PipelineConfig, parents: Iterable[int] | None = None
) -> dict[int, CellRecord]:
    """The records of ``config``'s group, by parent morton word: every one (one list,
    concurrent gets), or those of ``parents`` (concurrent gets, no list)."""
    keys = None if parents is None else [_key(config, p) for p in parents]
    return sync(_read_all(store, _prefix(config), keys))


async def _read_all(store: Store, prefix: str, keys: list[str] | None) -> dict[int, CellRecord]:
    if keys is None:
        keys = [key async for key in store.list_prefix(prefix) if key.endswith(".json")]
    blobs = await get_many(store, keys)
    records = [CellRecord.from_dict(json.loads(b)) for b in blobs if b is not None]
    return {r.result.parent_morton: r for r in records}


def output_digests(store: Store, keys: Iterable[str]) -> dict[str, str | None]:
    """The SHA-256 (hex) of each object's bytes as the store holds them now; ``None``: absent.

    What :func:`proven_cells` compares with the digests a record took of the
    bytes its cell put (:func:`magg_core.store.arrays.write_cell`): a put that
    succeeded stored those bytes (S3 checks each PUT's payload), so the
    comparison at the next run is what catches an object lost or altered since.
    """
    return sync(_digests(store, list(keys)))


def proven_cells(
    store: Store,
    config: PipelineConfig,
    fingerprints: Mapping[int, str],
    records: Mapping[int, CellRecord] | None = None,
) -> dict[int, CellRecord]:
    """The records that prove their cell's output is in the store as that cell wrote it.

    A record proves its cell when it was made from the same inputs
    (``fingerprints``: parent → :func:`input_fingerprint` of the run's
    request), its outcome is complete (not ``partial`` nor ``failed``), and
    every object it lists (:attr:`CellRecord.outputs`) holds the bytes it
    wrote -- or is still absent. A chunk or staging object deleted, truncated
    or overwritten since, or a record from before outputs were listed, proves
    nothing: that cell is done again. Costs one GET per listed object (a
    cell's compressed chunks and staging object: tens of kilobytes), and the
    records' when ``records`` (the store's, as :func:`read_records` gives them)
    is not passed.
    """
    records = read_records(store, config) if records is None else records
    candidates = {
        parent: record
        for parent, record in records.items()
        if fingerprints.get(parent) == record.fingerprint
        and record.result.is_complete
        and record.outputs
    }
    keys = [key for record in candidates.values() for key in record.outputs]
    now = output_digests(store, keys)
    return {
        parent: record
        for parent, record in candidates.items()
        if all(now[key] == digest for key, digest in record.outputs.items())
    }


async def _digests(store: Store, keys: list[str]) -> dict[str, str | None]:
    blobs = await get_many(store, keys)
    digests = [None if b is None else hashlib.sha256(b).hexdigest() for b in blobs]
    return dict(zip(keys, digests, strict=True))


def _prefix(config: PipelineConfig) -> str:
    return f"{RECORDS_PREFIX}/{config.output.child_order}/"


def _key(config: PipelineConfig, parent_morton: int) -> str:
    return f"{_prefix(config)}{int(parent_morton)}.json"
