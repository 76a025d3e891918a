"""A quicklook PNG of one statistic in polar stereographic projection.

For a first look at a run, not for publication: each child cell with data is
drawn as a dot at its centre, in EPSG:3031 (Antarctic) or EPSG:3413 (Arctic)
coordinates, so the picture matches the maps glaciologists are used to.
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


def quicklook(dataset: xr.Dataset, path: str | Path, variable: str = "h_mean") -> Path:
    """Plot ``variable`` of a gridded dataset (one child-order group) to a PNG.

    Returns the path written. Raises ``ValueError`` if the variable has no
    data at all, since an empty picture would look like a success.
    """
    values = np.asarray(dataset[variable].values, dtype=np.float64)
    has_data = np.isfinite(values)
    if not has_data.any():
        raise ValueError(f"{variable!r} has no data to plot")
    lat, lon = mortie.mort2geo(np.asarray(dataset["morton"].values)[has_data])
    crs = SOUTH_POLAR_STEREO if np.mean(lat) < 0 else NORTH_POLAR_STEREO
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)

    fig, ax = plt.subplots(figsize=(8, 7), dpi=120)
    cmap, lo, hi = colour_scale(variable, values[has_data])
    points = ax.scatter(
        np.asarray(x) / 1e3,
        np.asarray(y) / 1e3,
        c=values[has_data],
        s=2,
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
    ax.set_title(f"{variable}: {has_data.sum():,} cells with data")
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
