"""Assembly: the coarse pyramid levels' chunks, built from every parent's staging object.

Run by the flow once all cells are over, before consolidation, on every run
(a first run, a UI Retry, a watcher's update of a few cells): the cells of
this run have replaced their staging objects, the others' (cached, or not in
this run) are still in the store, so the result is the same whichever cells
ran -- assembly is idempotent and rebuilds every coarse chunk from scratch.
A parent without a staging object (no data, never run) contributes fill
values, and a chunk that is all fill values is removed (zarr's default), so
a cell that lost its data also disappears from the coarse levels.

Parents are read in catalog order, :data:`PARENTS_PER_BATCH` at a time, and each
level's chunks are written as soon as all their parents are read, so memory holds one
batch plus at most one chunk per level and statistic. Reads and writes keep
:data:`magg_core.store.objects.REQUESTS_IN_FLIGHT` requests in flight: a cycle's
~1,900 parents are ~5,700 chunks at the coarse levels (nine statistics), which
zarr's own writes, ten at a time, made ~570 round trips on S3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from zarr.abc.store import Store
from zarr.core.sync import sync

from magg_core.config import PipelineConfig
from magg_core.store.arrays import (
    TemplateMismatchError,
    arrays_metadata,
    chunk_objects,
    level_chunk_parents,
    read_template,
)
from magg_core.store.objects import get_many, put_many
from magg_core.store.staging import decode_staging, staged_orders, staging_key

PARENTS_PER_BATCH = 256
"""Staging objects read before the finished chunks are written (~50 KB each uncompressed)."""


def assemble_levels(store: Store, config: PipelineConfig) -> int:
    """Write every chunk of every coarse level of ``config`` from the staging objects.

    Parameters
    ----------
    store
        A store whose template was created with ``config``'s statistic arrays.
    config
        The run's config; its :func:`~magg_core.store.staging.staged_orders` are
        assembled (none: nothing is read or written).

    Returns
    -------
    int
        How many parents had a staging object (parents with data).

    Raises
    ------
    TemplateMismatchError
        If the store has no finished template of ``config``.
    ValueError
        If a staging object does not match ``config`` (see
        :func:`~magg_core.store.staging.decode_staging`).
    """
    orders = staged_orders(config)
    if not orders:
        return 0
    template = read_template(store, config)
    if template is None or template.config_hash != config.hash:
        raise TemplateMismatchError(
            f"the store has no finished template of config {config.hash} "
            f"(group /{config.output.child_order}/); create it before assembling levels"
        )
    return sync(_assemble(store, config, [int(p) for p in template.parents], orders))


async def _assemble(
    store: Store, config: PipelineConfig, parents: Sequence[int], orders: Sequence[int]
) -> int:
    names = [s.name for s in config.aggregation.statistics]
    read = await asyncio.gather(*(arrays_metadata(store, str(order), names) for order in orders))
    arrays = dict(zip(orders, read, strict=True))  # every level's metadata in one round
    empty = {
        order: {
            s.name: np.full(config.output.cells_per_parent(order), s.fill_value, dtype=s.dtype)
            for s in config.aggregation.statistics
        }
        for order in orders
    }

    pending: dict[int, list[dict[str, np.ndarray]]] = {order: [] for order in orders}
    written = dict.fromkeys(orders, 0)  # parents whose cells are written, per level
    found = 0
    for start in range(0, len(parents), PARENTS_PER_BATCH):
        keys = [staging_key(config, p) for p in parents[start : start + PARENTS_PER_BATCH]]
        batch = [
            None if data is None else decode_staging(data, config, key)
            for key, data in zip(keys, await get_many(store, keys), strict=True)
        ]
        found += sum(staged is not None for staged in batch)
        end = start + len(batch)
        chunks: dict[str, bytes | None] = {}
        for order in orders:
            pending[order] += [empty[order] if s is None else s[order] for s in batch]
            per_chunk = level_chunk_parents(config, order)
            upto = end if end == len(parents) else end - end % per_chunk  # whole chunks only
            if upto <= written[order]:
                continue
            ready = pending[order][: upto - written[order]]
            del pending[order][: upto - written[order]]
            first_chunk = written[order] // per_chunk
            for name in names:
                values = np.concatenate([block[name] for block in ready])
                path = f"{order}/{name}"
                chunks |= await chunk_objects(arrays[order][name], path, first_chunk, values)
            written[order] = upto
        await put_many(store, chunks)
    return found
