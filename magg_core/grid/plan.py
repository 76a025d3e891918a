"""From a catalog to the list of cell requests a run dispatches.

No I/O but for resolving a local mirror's links. The chunk index of each
request is the parent's position in the catalog's ascending order, which is
also the store's chunk order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import magg_core
from magg_core.access.credentials import DEFAULT_MARGIN
from magg_core.catalog.catalog import Catalog, CatalogGranule, cell_word_problem
from magg_core.config import PipelineConfig
from magg_core.errors import InputError
from magg_core.schema import OPERATOR, CellRequest, ExtractRequest, RequestError, check_request
from magg_core.store.records import CellRecord, input_fingerprint
from magg_core.urls import URLError, granule_url, mirror_granule, parse_s3_url

LAMBDA_MAX_TIMEOUT_S = 900
MAX_CELL_TIMEOUT_S = min(LAMBDA_MAX_TIMEOUT_S, int(DEFAULT_MARGIN.total_seconds()))
"""No longer than Lambda allows, nor than the credentials' refresh margin: a cell
is handed credentials valid for at least the margin, so they outlive the cell."""


class PlanError(InputError, ValueError):
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
    store_path: str,
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
        ``s3://`` URL: a local directory (``file://`` or a path) or a bucket
        prefix (``s3://``) holding copies. This is the operator's choice, and
        the only way a cell reads local files: a catalog's own URLs must be
        S3 objects, as a cell event's are (:func:`magg_core.urls.granule_url`),
        and a mirror is read only below itself (:func:`magg_core.urls.mirror_granule`).
    accept_partial
        Let partial cells write statistics (see :class:`CellRequest`).

    Raises
    ------
    PlanError
        If the catalog's cells are not morton words of the config's parent
        order (naming the first such cell), the selection does not fit the
        catalog, a catalog granule URL is not an S3 object, a granule name is
        not a plain file name or links outside a local mirror (with a
        mirror), a mirror is neither a directory nor an ``s3://`` prefix, or a
        request fails the check every entry point makes
        (:func:`magg_core.schema.check_request`: e.g. a cell listing one
        granule twice).
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
    mirror = None if granule_mirror is None else _mirror_base(granule_mirror)
    in_mirror: dict[str, str] = {}  # a granule crosses ~30 cells: resolve its link once
    requests = []
    for parent in selected:
        try:
            request = CellRequest(
                parent_morton=parent,
                parent_order=config.output.parent_order,
                child_order=config.output.child_order,
                granule_urls=tuple(_granule_urls(catalog, parent, mirror, in_mirror)),
                store_path=store_path,
                chunk_idx=position[parent],
                config=config_dict,
                accept_partial=accept_partial,
            )
            requests.append(check_request(request, OPERATOR, config))
        except RequestError as exc:
            raise PlanError(f"catalog cell {parent}: {exc}") from None
    return requests


def check_mirror(mirror: str | None, backend: str) -> None:
    """Refuse a local mirror for a backend whose cells cannot read local files.

    Lambda and ECS cells receive their request as an event, which may name
    only S3 objects (:meth:`CellRequest.from_event`); finding out in every
    cell would cost a failed invocation each.

    Raises
    ------
    PlanError
        If ``mirror`` is a directory and ``backend`` is not ``local``.
    """
    if mirror is not None and backend != "local" and _is_local(mirror):
        raise PlanError(
            f"granule_mirror {mirror!r} is a local directory, which only the local backend "
            f"reads: {backend} cells read S3 objects only — copy the granules to a bucket "
            "and pass s3://bucket/prefix"
        )


def _granule_urls(
    catalog: Catalog, parent: int, mirror: str | None, in_mirror: dict[str, str]
) -> list[str]:
    granules = catalog.cells[parent]
    if mirror is None:
        return [_catalog_url(parent, g) for g in granules]
    urls = []
    for g in granules:
        if g.name not in in_mirror:
            try:
                in_mirror[g.name] = mirror_granule(mirror, g.name)
            except URLError as exc:
                raise PlanError(f"catalog cell {parent}: {exc}") from None
        urls.append(in_mirror[g.name])
    return urls


def _catalog_url(parent: int, granule: CatalogGranule) -> str:
    """The granule's canonical ``s3://`` URL; a catalog never names a local file."""
    try:
        return granule_url(granule.s3)
    except URLError as exc:
        raise PlanError(f"catalog cell {parent}: granule {granule.name!r}: {exc}") from None


def _mirror_base(mirror: str) -> str:
    """The mirror without a trailing slash; an ``s3://`` one normalised and checked."""
    if not mirror.strip():
        raise PlanError("granule_mirror is empty: give a directory or an s3:// prefix")
    if _is_local(mirror):
        return mirror.rstrip("/")
    try:
        return parse_s3_url(mirror).url
    except URLError as exc:
        raise PlanError(
            f"granule_mirror {mirror!r} is neither a directory nor an s3:// prefix: {exc}"
        ) from None


def _is_local(mirror: str) -> bool:
    try:
        return urlsplit(mirror).scheme.lower() in ("", "file")
    except ValueError:  # not a URL at all: _mirror_base names the problem
        return False


def plan_extracts(
    requests: Sequence[CellRequest], *, height_change: bool = False
) -> list[ExtractRequest]:
    """One extract per granule the cells read, listing every cell it serves.

    Granules come in the order cells first name them, so a run extracts in
    chunk order and the first cells can be gridded early. ``height_change``:
    the fragments also keep the config's height-change columns (a run that
    keeps its fragments, :attr:`ExtractRequest.height_change`).
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
            height_change=height_change,
        )
        for url, cells in parents.items()
    ]


def cells_to_update(
    catalog: Catalog,
    template_parents: Iterable[int],
    records: Mapping[int, CellRecord],
    config_hash: str,
) -> tuple[list[int], list[int]]:
    """Which cells of a gridded store a newer catalog of the same cycle changes.

    A cell is stale when its record is missing or was made from another
    granule set (a granule published late, a new revision) -- compared by
    :func:`input_fingerprint`, so by granule names. Cells the catalog lists
    that the store's template lacks cannot be updated in place.

    Returns
    -------
    (stale, outside)
        Parent morton words, ascending: stale cells of the template, and
        catalog cells outside it.
    """
    parents = {int(p) for p in template_parents}
    stale, outside = [], []
    for parent in sorted(catalog.cells):
        if parent not in parents:
            outside.append(parent)
            continue
        granules = [g.name for g in catalog.cells[parent]]
        record = records.get(parent)
        if record is None or record.fingerprint != input_fingerprint(
            granules, config_hash, magg_core.__version__
        ):
            stale.append(parent)
    return stale, outside
