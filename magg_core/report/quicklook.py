"""A quicklook PNG of one statistic in polar stereographic projection.

For a first look at a run, not for publication: each cell with data is
drawn as a dot at its centre, in EPSG:3031 (Antarctic) or EPSG:3413 (Arctic)
coordinates, so the picture matches the maps glaciologists are used to. Dots
are about as wide as the cells of the dataset's order (read from the
``level`` of its ``cell_ids``), and never smaller than 2 points², so an
order-6 level shows as tiles and an order-12 one as fine dots.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: the quicklook is always a file

import matplotlib.pyplot as plt  # noqa: E402
import mortie  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from pyproj import Transformer  # noqa: E402

DIVERGING = frozenset({"dhdt"})
"""Signed quantities drawn with a diverging map centred on zero (thinning blue-red)."""
SOUTH_POLAR_STEREO = "EPSG:3031"
NORTH_POLAR_STEREO = "EPSG:3413"
AUTHALIC_RADIUS_KM = 6371.0072
"""Radius of the sphere with WGS84's area (Moritz 2000, Geodetic Reference System
1980, J. Geodesy 74:128, R2), on which HEALPix cells are equal-area."""
FIGURE_SIZE_IN = (8, 7)
AXES_WIDTH_PT = 0.75 * FIGURE_SIZE_IN[0] * 72
"""The map's approximate width in points (the colour bar and labels take the rest)."""


def cell_width_km(order: int) -> float:
    """Side of a square with a HEALPix cell's area: ``sqrt(4 pi R^2 / (12 * 4**order))``.

    A HEALPix grid of order ``k`` has ``12 * 4**k`` equal-area cells
    (Górski et al. 2005, ApJ 622:759, §3); about 1.6 km at order 12, 102 km at 6.
    """
    return float(np.sqrt(4 * np.pi * AUTHALIC_RADIUS_KM**2 / (12 * 4**order)))


def quicklook(dataset: xr.Dataset, path: str | Path, variable: str = "h_mean") -> Path:
    """Plot ``variable`` of a gridded dataset (one level's group) to a PNG.

    Returns the path written. Raises ``ValueError`` if the dataset has no such
    variable, or it has no data at all, since an empty picture would look like
    a success.
    """
    if variable not in dataset.data_vars:
        raise ValueError(
            f"no variable {variable!r} here; this store has {', '.join(sorted(dataset.data_vars))}"
        )
    values = np.asarray(dataset[variable].values, dtype=np.float64)
    has_data = np.isfinite(values)
    if not has_data.any():
        raise ValueError(f"{variable!r} has no data to plot")
    lat, lon = mortie.mort2geo(np.asarray(dataset["morton"].values)[has_data])
    crs = SOUTH_POLAR_STEREO if np.mean(lat) < 0 else NORTH_POLAR_STEREO
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)

    x_km, y_km = np.asarray(x) / 1e3, np.asarray(y) / 1e3
    order = dataset["cell_ids"].attrs.get("level")
    size = 2.0
    if order is not None:
        width = cell_width_km(int(order))
        extent = max(np.ptp(x_km), np.ptp(y_km)) + width
        size = max(size, (width / extent * AXES_WIDTH_PT) ** 2)

    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=120)
    cmap, lo, hi = colour_scale(variable, values[has_data])
    points = ax.scatter(
        x_km,
        y_km,
        c=values[has_data],
        s=size,
        vmin=lo,
        vmax=hi,
        cmap=cmap,
        linewidths=0,
    )
    units = dataset[variable].attrs.get("units", "m")
    fig.colorbar(points, ax=ax, label=f"{variable} ({units})")
    ax.set_aspect("equal")
    ax.set_xlabel(f"x ({crs}, km)")
    ax.set_ylabel(f"y ({crs}, km)")
    at = "" if order is None else f" at order {int(order)}"
    ax.set_title(f"{variable}{at}: {has_data.sum():,} cells with data")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def colour_scale(variable: str, values: np.ndarray) -> tuple[str, float, float]:
    """The colour map and limits for ``values`` (finite) of ``variable``.

    The 2nd–98th percentiles on ``viridis``; for a signed rate (:data:`DIVERGING`)
    ``RdBu`` symmetric about zero out to the 98th percentile of ``|value|``, so
    white is no change, red thinning and blue thickening.
    """
    if variable in DIVERGING:
        limit = float(np.percentile(np.abs(values), 98)) or 1.0
        return "RdBu", -limit, limit
    lo, hi = np.percentile(values, [2, 98])
    return "viridis", float(lo), float(hi)
