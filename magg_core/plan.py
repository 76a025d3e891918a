"""From a catalog to the list of cell requests a run dispatches.

Pure: no I/O. The chunk index of each request is the parent's position in
the catalog's ascending order, which is also the store's chunk order.
"""

from __future__ import annotations

from collections.abc import Sequence

from magg_core.catalog import Catalog, cell_word_problem
from magg_core.config import PipelineConfig
from magg_core.credentials import DEFAULT_MARGIN
from magg_core.extract import ExtractRequest
from magg_core.request import CellRequest

LAMBDA_MAX_TIMEOUT_S = 900
MAX_CELL_TIMEOUT_S = min(LAMBDA_MAX_TIMEOUT_S, int(DEFAULT_MARGIN.total_seconds()))
"""No longer than Lambda allows, nor than the credentials' refresh margin: a cell
is handed credentials valid for at least the margin, so they outlive the cell."""


class PlanError(ValueError):
    """A selection that does not fit the catalog or config; the message names it."""


def check_cell_timeout(seconds: int) -> int:
    """Validate a run's per-cell timeout (seconds); return it."""
    if not 0 < seconds <= MAX_CELL_TIMEOUT_S:
        raise PlanError(
            f"cell_timeout_s must be between 1 and {MAX_CELL_TIMEOUT_S} seconds, got {seconds}"
        )
    return seconds


def store_url_for(config: PipelineConfig, catalog: Catalog, store: str | None = None) -> str:
    """The run's store URL: ``store`` or the config's default, ``{cycle}`` filled in.

    A store template with ``{cycle}`` lets one deployment (or the cycle
    watcher) write each cycle to its own store.
    """
    template = store or config.output.store
    if not template:
        raise PlanError("no store given and the config has no output.store default")
    cycle = catalog.metadata.get("cycle")
    if "{cycle}" in template and cycle is None:
        raise PlanError(
            f"store {template!r} needs a cycle, but the catalog was built "
            "for a date range: pass a store URL without {cycle}"
        )
    return cycle_store(template, cycle) if cycle is not None else template


def cycle_store(template: str, cycle: int) -> str:
    """One cycle's store URL: ``{cycle}`` becomes the two-digit cycle number."""
    return template.format(cycle=f"{int(cycle):02d}")


def check_catalog_cells(catalog: Catalog, parent_order: int) -> None:
    """Reject a catalog whose cells are not morton words of ``parent_order``.

    Every cell becomes a chunk of the store's template at the config's
    parent order, so this runs before anything is written. A catalog file is
    already checked at its own order when loaded; this catches a catalog of
    another order, and one built in memory.
    """
    catalog_order = catalog.metadata.get("parent_order")
    if catalog_order is not None and catalog_order != parent_order:
        raise PlanError(
            f"catalog cells are order {catalog_order} but the config's "
            f"output.parent_order is {parent_order}"
        )
    for parent in sorted(catalog.cells):
        problem = cell_word_problem(int(parent), parent_order)
        if problem is not None:
            raise PlanError(
                f"catalog cell {parent} {problem} (config output.parent_order: {parent_order})"
            )


def plan_cells(
    catalog: Catalog,
    config: PipelineConfig,
    store_url: str,
    *,
    cells: Sequence[str | int] | None = None,
    max_cells: int | None = None,
    granule_mirror: str | None = None,
    accept_partial: bool = False,
) -> list[CellRequest]:
    """One request (without credentials) per selected parent cell, in chunk order.

    Parameters
    ----------
    cells
        Only these parent morton words (decimal strings or ints).
    max_cells
        Only the first N of the selection (a cheap trial run).
    granule_mirror
        Read each granule as ``{granule_mirror}/{name}`` instead of its NSIDC
        ``s3://`` URL: a local directory or a bucket holding copies.
    accept_partial
        Let partial cells write statistics (see :class:`CellRequest`).

    Raises
    ------
    PlanError
        If the catalog's cells are not morton words of the config's parent
        order (naming the first such cell), or the selection does not fit.
    """
    check_catalog_cells(catalog, config.output.parent_order)
    parents = [int(p) for p in catalog.parents]
    position = {parent: i for i, parent in enumerate(parents)}
    selected = parents
    if cells is not None:
        try:
            wanted = {int(c) for c in cells}
        except ValueError as exc:
            raise PlanError(f"cells must be morton words, got {list(cells)!r}") from exc
        unknown = sorted(wanted - position.keys())
        if unknown:
            raise PlanError(f"cells not in the catalog: {', '.join(map(str, unknown[:10]))}")
        selected = [p for p in parents if p in wanted]
    if max_cells is not None:
        if max_cells < 1:
            raise PlanError(f"max_cells must be at least 1, got {max_cells}")
        selected = selected[:max_cells]

    config_dict = config.to_dict()
    return [
        CellRequest(
            parent_morton=parent,
            parent_order=config.output.parent_order,
            child_order=config.output.child_order,
            granule_urls=tuple(_granule_urls(catalog, parent, granule_mirror)),
            store_path=store_url,
            chunk_idx=position[parent],
            config=config_dict,
            accept_partial=accept_partial,
        )
        for parent in selected
    ]


def _granule_urls(catalog: Catalog, parent: int, mirror: str | None) -> list[str]:
    if mirror is None:
        return catalog.urls(parent)
    return [f"{mirror.rstrip('/')}/{g.name}" for g in catalog.cells[parent]]


def plan_extracts(requests: Sequence[CellRequest]) -> list[ExtractRequest]:
    """One extract per granule the cells read, listing every cell it serves.

    Granules come in the order cells first name them, so a run extracts in
    chunk order and the first cells can be gridded early.
    """
    parents: dict[str, list[int]] = {}
    for request in requests:
        for url in request.granule_urls:
            parents.setdefault(url, []).append(request.parent_morton)
    if not requests:
        return []
    first = requests[0]
    return [
        ExtractRequest(
            granule_url=url,
            parents=tuple(cells),
            store_path=first.store_path,
            parent_order=first.parent_order,
            child_order=first.child_order,
            config=first.config,
        )
        for url, cells in parents.items()
    ]
