"""Staging: a parent cell's coarse pyramid levels, kept beside the arrays until assembly.

The child order's chunk belongs to one cell, which writes it as always. A
coarse level's chunk spans several parents (:func:`magg_core.store.arrays.level_chunk_parents`),
and cells run concurrently, so a cell does not write it: it writes its
coarse statistics (:func:`magg_core.stats.levels.level_statistics`) as one
*staging* object beside the arrays::

    levels/{child_order}/{parent morton}.npz

and the flow's assembly step (:mod:`magg_core.grid.assembly`) builds every
coarse chunk from all parents' staging objects after the cells. A staging
object is written exactly when the cell writes its child-order chunk, and
removed when that chunk is cleared (a cell with no data), so staging always
matches the child order's chunk. It is an uncompressed ``.npz`` of one
structured array per coarse order, named ``"{order}"``, a field per
statistic (read with ``allow_pickle=False``). Objects written before hold an
array per order and statistic, ``"{order}/{statistic}"``, and are read too.

Why this layout: compressing took ~4 ms a cell against ~1.4 ms to store it
plain (a dense parent: 40 KB compressed, 63 KB plain), for an object read
once, by the assembly; and numpy parses each array's header with Python's
``ast`` (~0.1 ms an array), so 54 arrays a parent cost the assembly 1.6 s of
its 3.1 s over 231 parents, where 6 cost a ninth of that.
"""

from __future__ import annotations

import io

import numpy as np
from zarr.abc.store import Store

from magg_core.config import PipelineConfig
from magg_core.stats.levels import LevelStatistics
from magg_core.store.objects import delete_prefix

LEVELS_PREFIX = "levels"


def staged_orders(config: PipelineConfig) -> tuple[int, ...]:
    """The coarse levels (every order of ``output.levels`` but the child order), ascending."""
    return tuple(k for k in config.output.orders if k != config.output.child_order)


def staging_key(config: PipelineConfig, parent_morton: int) -> str:
    """Where a parent's staging object lives in the store."""
    return f"{LEVELS_PREFIX}/{config.output.child_order}/{int(parent_morton)}.npz"


def encode_staging(levels: LevelStatistics) -> bytes:
    """A staging object's bytes (see the module docstring)."""
    arrays = {}
    for order, stats in levels.items():
        record = np.empty(
            next(iter(stats.values())).shape, dtype=[(n, v.dtype) for n, v in stats.items()]
        )
        for name, values in stats.items():
            record[name] = values
        arrays[str(order)] = record
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_staging(data: bytes, config: PipelineConfig, key: str) -> LevelStatistics:
    """The coarse statistics a staging object holds, checked against ``config``.

    Raises
    ------
    ValueError
        Naming ``key``, if a statistic is missing or has another dtype or length
        than ``config`` gives it (a staging object of another config), or the
        object would need unpickling.
    """
    out: LevelStatistics = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for order in staged_orders(config):
            record = npz[str(order)] if str(order) in npz.files else None
            out[order] = {}
            for stat in config.aggregation.statistics:
                name = f"{order}/{stat.name}"
                if record is not None and stat.name in (record.dtype.names or ()):
                    values = record[stat.name]
                elif record is None and name in npz.files:  # written before one array an order
                    values = npz[name]
                else:
                    raise ValueError(f"staging object {key} lacks {name!r}")
                n_cells = config.output.cells_per_parent(order)
                if values.dtype != stat.dtype or values.shape != (n_cells,):
                    raise ValueError(
                        f"staging object {key}: {name!r} is {values.dtype} {values.shape}, "
                        f"expected {stat.dtype} ({n_cells},)"
                    )
                out[order][stat.name] = values
    return out


def staging_object(
    config: PipelineConfig, parent_morton: int, levels: LevelStatistics | None
) -> dict[str, bytes | None]:
    """A parent's staging object as :func:`.arrays.write_cell` writes it: key → bytes,
    or key → ``None`` (remove it: the cell has no data).

    The cell writes it with its child-order chunk, under the same rules, so
    the two always agree: one PUT or DELETE, which S3 applies atomically;
    writing again replaces the object.
    """
    key = staging_key(config, parent_morton)
    return {key: None if levels is None else encode_staging(levels)}


def clear_staging(store: Store, config: PipelineConfig) -> None:
    """Remove every staging object of ``config``'s child order (a new template has none)."""
    delete_prefix(store, f"{LEVELS_PREFIX}/{config.output.child_order}")
