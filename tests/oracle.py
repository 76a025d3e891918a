"""An independent reference for magg's output, computed the slow, obvious way.

Nothing here uses magg_core's reading, gridding or aggregation: granules are
read whole with h5py, points are assigned to cells with healpy (on authalic
latitude, as measured (docs/architecture.md §Grid): it agrees with mortie on 99.9999 % of points,
and on every point of the samples the tests use), and statistics come from a
pandas ``groupby``. A test that compares magg with this oracle therefore
checks magg's reading, filtering, cell assignment and statistics at once.

Only the built-in ``atl06`` config is modelled: quality 0 is good, the fill
value and non-finite values are dropped, ``h_mean`` is weighted by
``1/h_li_sigma**2``, ``h_sigma = 1/sqrt(sum(1/sigma**2))``, the variance is
the population one (ddof 0) and quantiles interpolate linearly (numpy's
default, which is also pandas').
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import h5py
import healpy
import mortie
import numpy as np
import pandas as pd

BEAMS = ("gt1l", "gt1r", "gt2l", "gt2r", "gt3l", "gt3r")
FILL = np.float32(3.4028235e38)
STATISTICS = (
    "count",
    "h_min",
    "h_max",
    "h_mean",
    "h_sigma",
    "h_variance",
    "h_q25",
    "h_q50",
    "h_q75",
)


def good_points(paths: Iterable[str | Path], child_order: int = 12) -> pd.DataFrame:
    """Every good point of the granules, with its HEALPix nested id at ``child_order``.

    Columns: ``granule`` (file name), ``beam``, ``row`` (within the beam),
    ``latitude``, ``longitude``, ``delta_time``, ``h_li``, ``h_li_sigma`` (float32 as stored)
    and ``cell`` (int64 nested id).
    """
    frames = []
    for path in paths:
        with h5py.File(path, "r") as f:
            for beam in BEAMS:
                if beam not in f:
                    continue
                g = f[beam]["land_ice_segments"]
                h = g["h_li"][:]
                sigma = g["h_li_sigma"][:]
                good = (
                    (g["atl06_quality_summary"][:] == 0)
                    & (h != FILL)
                    & (sigma != FILL)
                    & np.isfinite(h)
                    & np.isfinite(sigma)
                    & (sigma > 0)  # a standard error describes a measurement only if positive
                )
                rows = np.flatnonzero(good)
                frames.append(
                    pd.DataFrame(
                        {
                            "granule": Path(path).name,
                            "beam": beam,
                            "row": rows,
                            "latitude": g["latitude"][:][rows],
                            "longitude": g["longitude"][:][rows],
                            "delta_time": g["delta_time"][:][rows],
                            "h_li": h[rows],
                            "h_li_sigma": sigma[rows],
                        }
                    )
                )
    points = pd.concat(frames, ignore_index=True)
    points["cell"] = order_cells(points, child_order)
    return points


def order_cells(points: pd.DataFrame, order: int) -> np.ndarray:
    """healpy's nested cell of each point at ``order``, on authalic latitude (int64)."""
    return healpy.ang2pix(
        2**order,
        points["longitude"].to_numpy(),
        mortie.geodetic_to_authalic(points["latitude"].to_numpy()),
        nest=True,
        lonlat=True,
    ).astype(np.int64)


FILTERS = ("quality", "fill", "sigma")
"""The filters in the order they apply: a point is counted under the first that drops it."""


def filter_counts(
    paths: Iterable[str | Path], parent: int, parent_order: int = 6, child_order: int = 12
) -> dict[str, int]:
    """How many points of the granules inside one parent each filter drops.

    Every row of every beam is placed with healpy, whatever its quality; a
    row inside the parent is dropped for ``quality`` if its flag is not 0,
    else for ``fill`` if ``h_li`` or ``h_li_sigma`` is the fill value or not
    finite, else for ``sigma`` if ``h_li_sigma`` is not positive.
    """
    frames = []
    for path in paths:
        with h5py.File(path, "r") as f:
            for beam in BEAMS:
                if beam not in f:
                    continue
                g = f[beam]["land_ice_segments"]
                h, sigma = g["h_li"][:], g["h_li_sigma"][:]
                no_value = (h == FILL) | (sigma == FILL) | ~np.isfinite(h) | ~np.isfinite(sigma)
                with np.errstate(invalid="ignore"):
                    reason = np.select(
                        [g["atl06_quality_summary"][:] != 0, no_value, ~(sigma > 0)],
                        list(FILTERS),
                        "kept",
                    )
                frames.append(
                    pd.DataFrame(
                        {
                            "latitude": g["latitude"][:],
                            "longitude": g["longitude"][:],
                            "reason": reason,
                        }
                    )
                )
    rows = pd.concat(frames, ignore_index=True)
    rows["cell"] = order_cells(rows, child_order)
    inside = points_in_parent(rows, parent, parent_order, child_order)
    counts = inside["reason"].value_counts()
    return {name: int(counts.get(name, 0)) for name in FILTERS}


def parent_morton(parent_id: int, parent_order: int) -> int:
    """The morton word (as a Python int) of a HEALPix nested id."""
    per_base = 4**parent_order
    return int(mortie.norm2mort(parent_id % per_base, parent_id // per_base, parent_order))


def points_in_parent(
    points: pd.DataFrame, parent: int, parent_order: int = 6, child_order: int = 12
) -> pd.DataFrame:
    """The points of one parent (given by morton word), with ``child`` = position in it."""
    shift = 2 * (child_order - parent_order)
    by_parent = points["cell"].to_numpy() >> shift
    ids = {parent_morton(int(p), parent_order): int(p) for p in np.unique(by_parent)}
    if parent not in ids:
        return points.iloc[:0].assign(child=np.empty(0, dtype=np.int64))
    inside = points[by_parent == ids[parent]]
    return inside.assign(child=inside["cell"].to_numpy() - (ids[parent] << shift))


def reference_statistics(
    paths: Iterable[str | Path], parent_order: int = 6, child_order: int = 12
) -> dict[int, dict[str, np.ndarray]]:
    """Per-child statistics of every parent that has good points.

    Returns
    -------
    dict
        Parent morton word (int) → statistic name → array of length
        ``4**(child_order - parent_order)`` indexed by child position
        (``child id - (parent id << 2*(child_order - parent_order))``).
        ``count`` is int64 with 0 for empty children; the rest are float64
        with NaN for empty children.
    """
    points = good_points(paths, child_order)
    shift = 2 * (child_order - parent_order)
    n_children = 4 ** (child_order - parent_order)
    h = points["h_li"].astype(np.float64)
    w = 1.0 / points["h_li_sigma"].astype(np.float64) ** 2
    frame = pd.DataFrame({"cell": points["cell"], "h": h, "w": w, "wh": w * h})
    grouped = frame.groupby("cell")
    table = pd.DataFrame(
        {
            "count": grouped["h"].size(),
            "h_min": grouped["h"].min(),
            "h_max": grouped["h"].max(),
            "h_mean": grouped["wh"].sum() / grouped["w"].sum(),
            "h_sigma": 1.0 / np.sqrt(grouped["w"].sum()),
            "h_variance": grouped["h"].var(ddof=0),
            "h_q25": grouped["h"].quantile(0.25),
            "h_q50": grouped["h"].quantile(0.50),
            "h_q75": grouped["h"].quantile(0.75),
        }
    )
    cells = table.index.to_numpy(dtype=np.int64)
    result = {}
    for parent_id in np.unique(cells >> shift):
        mine = (cells >> shift) == parent_id
        position = cells[mine] - (int(parent_id) << shift)
        stats = {}
        for name in STATISTICS:
            if name == "count":
                array = np.zeros(n_children, dtype=np.int64)
            else:
                array = np.full(n_children, np.nan)
            array[position] = table[name].to_numpy()[mine]
            stats[name] = array
        result[parent_morton(int(parent_id), parent_order)] = stats
    return result


def reference_level(
    paths: Iterable[str | Path], parents: Iterable[int], order: int, parent_order: int = 6
) -> dict[str, np.ndarray]:
    """The statistics of every cell of ``order``, laid out as a store's group of that order.

    Points are assigned to cells with healpy at ``order`` itself (not by
    coarsening finer cells), so this checks a pyramid level independently.
    ``parents`` (morton words) give the layout: each parent's
    ``4**(order - parent_order)`` cells in nested-id order, parents one after
    another. Cells without points hold 0 (``count``) or NaN.
    """
    parents = [int(p) for p in parents]
    per_parent = 4 ** (order - parent_order)
    by_parent = reference_statistics(paths, parent_order, order)
    out = {}
    for name in STATISTICS:
        array = np.zeros(len(parents) * per_parent, dtype=np.int64)
        if name != "count":
            array = np.full(len(parents) * per_parent, np.nan)
        for i, parent in enumerate(parents):
            if parent in by_parent:
                array[i * per_parent : (i + 1) * per_parent] = by_parent[parent][name]
        out[name] = array
    return out
