"""``python -m bench.height_change_figure [--dir magg-demo]``: docs/height-change.png.

From the output of ``magg demo --height-change`` (run first if the directory
lacks it): per child cell, the planted rate of the multi-cycle sample
(:func:`magg_core.granules.sample.planted_dhdt` at the cell's centre), the fitted
``dhdt`` of the height-change store, and the rate from differencing cell
means, ``(h_mean of cycle 22 − h_mean of cycle 20) / (182 days)``. Prints
the error statistics docs/height-change.md quotes and draws three maps on one
diverging scale plus the two errors' histograms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mortie  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from pyproj import Transformer  # noqa: E402

from bench._common import REPO  # noqa: E402
from magg_core.granules.sample import planted_dhdt  # noqa: E402

FIRST, LAST = 20, 22
YEARS_BETWEEN = 2 * 91 / 365.25
"""Nominal time between the same pass in cycles 20 and 22: two 91-day cycles."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="magg-demo", help="the demo's directory")
    parser.add_argument("--output", default=str(REPO / "docs" / "height-change.png"))
    args = parser.parse_args(argv)
    workdir = Path(args.dir)
    if not (workdir / "dhdt.zarr").exists():
        from magg.flows.cli import main as magg

        if magg(["demo", "--height-change", "--dir", str(workdir)]):
            return 1
    fit = xr.open_zarr(workdir / "dhdt.zarr", group="12")
    first = xr.open_zarr(workdir / f"atl06-cycle{FIRST}.zarr", group="12")
    last = xr.open_zarr(workdir / f"atl06-cycle{LAST}.zarr", group="12")
    means = mean_differences(fit, first, last)
    fitted = fit["n_points"].values > 0
    morton = fit["morton"].values
    lat, lon = mortie.mort2geo(morton[fitted])
    planted = planted_dhdt(lat, lon)
    dhdt = fit["dhdt"].values[fitted]
    differenced = means[fitted]
    both = np.isfinite(differenced)
    for name, values in (("fit", dhdt), ("mean difference", differenced)):
        error = (values - planted)[both]
        print(
            f"{name:>15}: {both.sum():,} cells, error median {np.median(error):+.3f}, "
            f"median |error| {np.median(np.abs(error)):.3f}, "
            f"RMS {np.sqrt(np.mean(error**2)):.3f}, "
            f"95th |error| {np.percentile(np.abs(error), 95):.3f} m/yr"
        )
    se = fit["dhdt_se"].values[fitted]
    print(f"fit within 2 SE of planted: {np.mean(np.abs(dhdt - planted) <= 2 * se):.1%}")
    draw(lat, lon, planted, dhdt, differenced, Path(args.output))
    print(args.output)
    return 0


def mean_differences(fit: xr.Dataset, first: xr.Dataset, last: xr.Dataset) -> np.ndarray:
    """``(h_mean_last − h_mean_first) / YEARS_BETWEEN`` on the dh/dt store's cells (NaN if none)."""
    out = np.full(fit.sizes["cells"], np.nan)
    rows = {int(c): i for i, c in enumerate(fit["cell_ids"].values)}
    lookup = {}
    for cycle in (first, last):
        ids = cycle["cell_ids"].values
        values = cycle["h_mean"].values
        lookup[id(cycle)] = {int(c): v for c, v in zip(ids, values, strict=True) if np.isfinite(v)}
    a, b = lookup[id(first)], lookup[id(last)]
    for cell in a.keys() & b.keys() & rows.keys():
        out[rows[cell]] = (b[cell] - a[cell]) / YEARS_BETWEEN
    return out


def draw(
    lat: np.ndarray,
    lon: np.ndarray,
    planted: np.ndarray,
    fitted: np.ndarray,
    differenced: np.ndarray,
    path: Path,
) -> None:
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3031", always_xy=True).transform(lon, lat)
    x, y = np.asarray(x) / 1e3, np.asarray(y) / 1e3
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), dpi=110, layout="constrained")
    panels = (
        ("planted", planted),
        ("fitted: plane + trend", fitted),
        (f"mean difference {FIRST}→{LAST}", differenced),
    )
    for ax, (title, values) in zip(axes, panels, strict=False):
        shown = np.isfinite(values)
        points = ax.scatter(
            x[shown],
            y[shown],
            c=values[shown],
            s=1.5,
            cmap="RdBu",
            vmin=-0.8,
            vmax=0.8,
            linewidths=0,
        )
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xlabel("x (EPSG:3031, km)")
    axes[0].set_ylabel("y (EPSG:3031, km)")
    fig.colorbar(points, ax=axes[:3], label="dh/dt (m/yr)", shrink=0.9)
    both = np.isfinite(differenced)
    bins = np.linspace(-1.5, 1.5, 121)
    axes[3].hist((fitted - planted)[both], bins, alpha=0.7, label="fit − planted")
    axes[3].hist((differenced - planted)[both], bins, alpha=0.6, label="mean difference − planted")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("error (m/yr)")
    axes[3].set_ylabel("child cells")
    axes[3].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
