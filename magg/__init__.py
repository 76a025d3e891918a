"""magg: ICESat-2 ATL06 land-ice heights gridded into HEALPix Zarr stores.

The public Python API, for a notebook as for a script: the same job as the
``magg`` command line, without a shell in between.

>>> import magg
>>> summary = magg.run(catalog="magg-demo/catalog.json", store="magg-demo/atl06.zarr",
...                    credentials="none", granule_mirror="magg-demo/granules")
>>> ds = magg.open("magg-demo/atl06.zarr", order=12)   # decoded with xdggs
>>> ds.dggs.cell_centers()

Importing this module is cheap: Prefect, zarr and xarray are imported by the
functions that need them. The flows and tasks live in :mod:`magg.flows` and
:mod:`magg.tasks`, the cloud-agnostic library in :mod:`magg_core`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magg_core import DISTRIBUTION, __version__

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["DISTRIBUTION", "__version__", "height_change", "open", "run"]


def run(**parameters: Any) -> dict[str, Any]:
    """Run the ``process-cycle`` flow here and return its summary.

    Parameters are those of :func:`magg.flows.process_cycle.process_cycle`
    (the options of ``magg run``): e.g. ``cycle=22`` or ``catalog="catalog.json"``,
    ``store="s3://bucket/c22.zarr"``, ``backend="local"``, ``credentials="none"``
    for public or local granules, ``granule_mirror="dir"`` for granules on disk.

    Returns
    -------
    dict
        The run's summary: ``cells`` (one row per parent cell with its
        status), ``failed_cells``, counts, timings, the cost estimate and
        ``markdown`` (the table ``magg run`` prints). A run with failed or
        partial cells returns its summary too (``failed_cells`` non-empty)
        rather than raising, as ``magg run`` prints it and exits 1.

    Raises
    ------
    ValueError
        Bad input (config, catalog, store URL, cells), named in the message.
    """
    _prefect_defaults()
    from magg.flows.process_cycle import process_cycle

    return _summary(process_cycle, parameters)


def height_change(**parameters: Any) -> dict[str, Any]:
    """Run the ``height-change`` flow here and return its summary.

    Parameters are those of :func:`magg.flows.height_change.height_change`
    (the options of ``magg height-change``): ``cycles=[20, 21, 22]``,
    ``store="s3://bucket/c{cycle}.zarr"`` (cycle stores run with
    ``keep_fragments=True``), ``output="s3://bucket/dhdt.zarr"``, fit options.
    Returns the summary as :func:`run` does, also when some parents failed.
    """
    _prefect_defaults()
    from magg.flows.height_change import height_change as flow

    return _summary(flow, parameters)


def _prefect_defaults() -> None:
    """Prefect settings for a run without a configured server, unless the user set them.

    Without ``PREFECT_API_URL`` a flow runs on a temporary local server, whose
    start-up can exceed Prefect's 20 s default on a busy small machine. Prefect
    reads its settings when first imported, so this runs before the flows are.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _summary(flow: Callable[..., dict[str, Any]], parameters: dict[str, Any]) -> dict[str, Any]:
    """The flow's summary: its return value, or the one its CellsFailedError carries."""
    from magg_core.errors import CellsFailedError

    try:
        return flow(**parameters)
    except CellsFailedError as exc:
        if exc.summary is None:
            raise
        return exc.summary


def open(store: str, order: int = 12, **kwargs: Any) -> xr.Dataset:  # noqa: A001
    """One level of a magg store as an xarray Dataset with its DGGS index (xdggs).

    Parameters
    ----------
    store
        A path, ``file://`` or ``s3://bucket/prefix`` URL of a store magg wrote
        (S3 credentials and endpoint from the environment, as for ``magg inspect``).
    order
        The HEALPix order of the group to open (``12`` the finest; ``6``–``11``
        the coarser levels of the built-in config).
    **kwargs
        Passed to :func:`xarray.open_zarr` (e.g. ``chunks=None`` to load eagerly).

    Returns
    -------
    xarray.Dataset
        Dimension ``cells``; the statistics as data variables, ``cell_ids``
        (HEALPix nested, order ``order``) with an xdggs index, ``morton``.

    Raises
    ------
    ValueError
        The store has no group for ``order`` (the message lists the orders it has).

    Stores written by magg before 0.2 name the ellipsoid by a bare string,
    which xdggs 0.7 cannot decode; they are decoded here as if written today
    (``magg upgrade STORE`` rewrites them in place for other readers).
    """
    import xarray as xr
    import xdggs
    import zarr

    from magg_core.store.arrays import current_dggs_attributes, open_store

    zstore = open_store(store, read_only=True)
    root = zarr.open_group(zstore, mode="r")
    orders = sorted(int(name) for name, _ in root.groups() if name.isdigit())
    if order not in orders:
        raise ValueError(
            f"{store}: no group for order {order} (orders present: "
            f"{', '.join(map(str, orders)) or 'none'})"
        )
    ds = xr.open_zarr(zstore, group=str(order), **kwargs)
    group_attrs, cell_ids_attrs = current_dggs_attributes(ds.attrs, ds["cell_ids"].attrs)
    ds.attrs.update(group_attrs)
    ds["cell_ids"].attrs.update(cell_ids_attrs)
    return xdggs.decode(ds)
