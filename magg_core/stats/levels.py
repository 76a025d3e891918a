"""Pyramid levels: one parent cell's statistics at every coarser order.

A config's ``output.levels`` (e.g. ``[6, 7, ..., 12]``) asks for a group per
order. Every level is computed *from the points*, not merged from finer cells,
so order statistics (min, max, quantiles) are exact at every order: in
HEALPix nested numbering the order-``k`` ancestor of the order-``c`` cell
``i`` is ``i >> 2*(c - k)`` (Górski et al. 2005, ApJ 622:759, §4: each cell
splits into 4 consecutive children), and so is a child *position* within a
parent, because a parent's first child id is a multiple of ``4**(c - p)``.
A cell therefore aggregates its points once per level with the shifted
positions and that level's number of cells per parent, all levels from one
sort (:func:`magg_core.stats.aggregate.aggregate_levels`). How the coarse
levels reach the store is :mod:`magg_core.store.staging`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from magg_core.config import PipelineConfig
from magg_core.stats.aggregate import aggregate_levels, require_finite

LevelStatistics = dict[int, dict[str, np.ndarray]]
"""Order → statistic name → one value per cell of that order in the parent."""


def level_statistics(
    child_index: np.ndarray, columns: Mapping[str, np.ndarray], config: PipelineConfig
) -> LevelStatistics:
    """One parent's statistics at every order of the config, each computed from the points.

    All orders come from one sort of the points by (child, value)
    (:func:`magg_core.stats.aggregate.aggregate_levels`): each order is exactly
    what :func:`magg_core.stats.aggregate.aggregate` gives for the shifted
    positions, at a fraction of the cost of sorting once per order.

    Parameters
    ----------
    child_index
        Child position (at ``child_order``) of each valid point, ``0 ..
        4**(child_order - parent_order) - 1``, shape ``(n_points,)``.
    columns
        The ``data_source`` variables of those points, each ``(n_points,)``.
    config
        Its ``output.orders`` are computed: the child order, and the
        coarse orders if it has levels.

    Returns
    -------
    dict
        Order ``k`` → statistic → array of ``4**(k - parent_order)`` values in
        the statistic's dtype (fill value where a cell has no point), by
        ascending order.

    Raises
    ------
    magg_core.stats.aggregate.NonFiniteStatisticError
        If a statistic is not finite for a cell with points: at the child
        order as :func:`magg_core.stats.aggregate.require_finite` says it, at a
        coarse order prefixed with the order.
    ValueError
        As :func:`magg_core.stats.aggregate.aggregate`.
    """
    child_order = config.output.child_order
    orders = sorted(config.output.orders, reverse=True)  # the child order first
    shifts = [child_order - order for order in orders]
    computed = aggregate_levels(child_index, columns, config, shifts)
    counts = np.bincount(np.asarray(child_index), minlength=config.output.children_per_parent)
    out: LevelStatistics = {}
    for order, stats in zip(orders, computed, strict=True):
        cells = counts.reshape(config.output.cells_per_parent(order), -1).sum(axis=1)
        try:
            require_finite(stats, cells, config)
        except ValueError as exc:
            if order == child_order:
                raise
            raise type(exc)(f"order {order}: {exc}") from exc
        out[order] = stats
    return dict(sorted(out.items()))  # ascending, as staging objects list them
