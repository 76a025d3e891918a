"""The plane-plus-trend fit against an independent per-child lstsq, and against the planted truth.

The oracle here is written from the rule stated in magg_core/height_change/dhdt.py, one
child at a time with ``np.linalg.lstsq`` on uncentred rows (x, y in metres),
weights applied by scaling rows with ``1/h_sigma``. Sample points are read
with h5py, assigned to order-12 cells with healpy on authalic latitude (as
tests/oracle.py does), and placed about the cell centre given by healpy's
``pix2ang`` converted back to geodetic latitude with mortie, projected with
pyproj directly (not through magg).
"""

from __future__ import annotations

from datetime import UTC, datetime

import h5py
import healpy
import mortie
import numpy as np
import pytest
from pyproj import Geod, Proj, Transformer

from magg_core.granules.sample import (
    GLACIER_DHDT,
    PLANTED_EPOCH,
    planted_dhdt,
    planted_height,
    write_cycles,
)
from magg_core.height_change.dhdt import FIT_ARRAYS, cell_offsets, fit_height_change, years_since
from magg_core.schema import FitOptions

FILL = np.float32(3.4028235e38)
BEAMS = ("gt1l", "gt1r", "gt2l", "gt2r", "gt3l", "gt3r")
NSIDE = 2**12
ATLAS_EPOCH_UTC_S = datetime(2018, 1, 1, tzinfo=UTC).timestamp()  # delta_time's zero, in UTC


def t_quantile_975(dof):
    """Student's t 97.5 % quantile (Abramowitz & Stegun 26.7.5; to ~1e-4 for dof >= 6)."""
    z = 1.959963984540054
    v = np.asarray(dof, dtype=np.float64)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


# --- the oracle ---------------------------------------------------------------------


def oracle_fit(child, x, y, t, h, cycle, n_children, options, h_sigma=None):
    """Per child: lstsq, the rejection rule of magg_core/height_change/dhdt.py, written plainly."""
    sigma = np.ones_like(h) if h_sigma is None else h_sigma
    out = {name: np.full(n_children, fill, dtype=np.float64) for name, _, fill, _, _ in FIT_ARRAYS}
    for c in np.unique(child):
        rows = child == c
        X = np.column_stack([np.ones(rows.sum()), x[rows], y[rows], t[rows]])
        z, s, cyc = h[rows], sigma[rows], cycle[rows]

        def solve(keep, X=X, z=z, s=s, cyc=cyc):
            if keep.sum() < options.min_points or np.unique(cyc[keep]).size < options.min_cycles:
                return None
            A = X[keep] / s[keep, None]
            centred = X[keep].copy()
            w = 1 / s[keep] ** 2
            centred[:, 1:] -= (w[:, None] * centred[:, 1:]).sum(0) / w.sum()
            centred[:, 1:3] /= 1000
            if 1 / np.linalg.cond(centred / s[keep, None]) ** 2 < options.min_rcond:
                return None
            return np.linalg.lstsq(A, z[keep] / s[keep], rcond=None)[0]

        keep = np.ones(rows.sum(), dtype=bool)
        beta = solve(keep)
        for _ in range(options.max_iterations):
            if beta is None:
                break
            r = z - X @ beta
            u = r[keep] / s[keep]
            k = 1.4826 * np.median(np.abs(u - np.median(u)))
            new = np.abs(r) <= options.rejection_threshold * np.maximum(k * s, options.min_sigma)
            if np.array_equal(new, keep):
                break
            keep = new
            beta = solve(keep)
        if beta is None:
            continue
        r = (z - X @ beta)[keep]
        n = keep.sum()
        A = X[keep] / s[keep, None]
        covariance = np.sum((r / s[keep]) ** 2) / (n - 4) * np.linalg.inv(A.T @ A)
        values = {
            "dhdt": beta[3],
            "dhdt_se": np.sqrt(covariance[3, 3]),
            "h0": beta[0],
            "slope_x": beta[1],
            "slope_y": beta[2],
            "rms": np.sqrt(np.mean(r**2)),
            "n_points": n,
            "n_cycles": np.unique(cyc[keep]).size,
            "t_span": np.ptp(t[rows][keep]),
        }
        for name, value in values.items():
            out[name][c] = value
    return out


def assert_matches_oracle(got, expected, children=None):
    pick = slice(None) if children is None else children
    for name, dtype, _, _, _ in FIT_ARRAYS:
        assert got[name].dtype == dtype, name
        a, b = got[name][pick].astype(np.float64), expected[name][pick]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        if name in ("n_points", "n_cycles"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        elif name == "h0":  # float32 of a ~3 km height: its own rounding is ~1e-4 m
            np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


# --- random points ------------------------------------------------------------------


def random_points(rng, n_children=60):
    """Points in children of 0–150 points, 1–5 cycles, with 3 % blunders of 1–20 m."""
    parts = []
    for c in range(n_children):
        n = int(rng.integers(0, 150))
        cycles = rng.choice(np.arange(1, 6), size=int(rng.integers(1, 6)), replace=False)
        cycle = rng.choice(cycles, n)
        t = (cycle - 3) * 0.25 + rng.uniform(0, 1e-5, n)
        x, y = rng.uniform(-800, 800, n), rng.uniform(-800, 800, n)
        sigma = np.clip(rng.lognormal(np.log(0.06), 0.6, n), 0.02, 0.5)
        h = 2000 + 0.03 * x - 0.01 * y + rng.normal(0, 1) * t + rng.normal(0, sigma)
        blunder = rng.random(n) < 0.03
        h[blunder] += rng.choice([-1, 1], blunder.sum()) * rng.uniform(1, 20, blunder.sum())
        parts.append(np.column_stack([np.full(n, c), x, y, t, h, cycle, sigma]))
    a = np.concatenate(parts)
    return {
        "child": a[:, 0].astype(np.int64),
        "x": a[:, 1],
        "y": a[:, 2],
        "t": a[:, 3],
        "h": a[:, 4],
        "cycle": a[:, 5].astype(np.int64),
        "h_sigma": a[:, 6],
    }


@pytest.mark.parametrize("weighted", [False, True])
def test_fit_equals_per_child_lstsq_on_random_points_with_blunders(weighted):
    p = random_points(np.random.default_rng(11))
    sigma = p["h_sigma"] if weighted else None
    args = (p["child"], p["x"], p["y"], p["t"], p["h"], p["cycle"], 64)
    got = fit_height_change(*args, FitOptions(), h_sigma=sigma)
    expected = oracle_fit(*args, FitOptions(), h_sigma=sigma)
    fitted = np.isfinite(expected["dhdt"])
    assert 20 <= fitted.sum() < 60, "some children fitted, some filled"
    assert (got["n_points"][fitted] < np.bincount(p["child"], minlength=64)[fitted]).any()
    assert_matches_oracle(got, expected)


# --- degenerate input ---------------------------------------------------------------


def test_degenerate_children_are_filled_not_fatal():
    rng = np.random.default_rng(2)
    n = 40
    cycle = np.tile([1, 2, 3, 4], n // 4)
    t = (cycle - 2) * 0.25
    along = rng.uniform(-800, 800, n)
    cases = {
        0: (along, 0.5 * along, 100 + 0.01 * along + 0.1 * t),  # collinear: one line
        1: (along, rng.uniform(-800, 800, n), 100 + 0.1 * t),  # fine
        2: (along, rng.uniform(-800, 800, n), np.full(n, 100.0)),  # identical heights
    }
    parts = [np.column_stack([np.full(n, c), x, y, t, h, cycle]) for c, (x, y, h) in cases.items()]
    few = np.column_stack([np.full(n, 3), along, along[::-1], t, t, np.where(cycle > 2, 2, 1)])
    a = np.concatenate([*parts, few])
    out = fit_height_change(
        a[:, 0].astype(int), a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5].astype(int), 5
    )
    assert np.isnan(out["dhdt"][[0, 3, 4]]).all() and (out["n_points"][[0, 3, 4]] == 0).all()
    assert out["dhdt"][1] == pytest.approx(0.1, abs=1e-9)
    assert out["dhdt"][2] == 0 and out["dhdt_se"][2] == 0 and out["n_points"][2] == n
    assert out["n_cycles"][2] == 4 and out["t_span"][2] == pytest.approx(0.75)
    empty = fit_height_change(*(np.empty(0),) * 6, 4)
    for name, dtype, fill, _, _ in FIT_ARRAYS:
        assert empty[name].dtype == dtype and empty[name].shape == (4,)
        np.testing.assert_array_equal(empty[name], np.full(4, fill, dtype=dtype))


def test_bad_input_is_refused_naming_it():
    ok = [np.zeros(3, dtype=int), np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3)]
    with pytest.raises(ValueError, match="child must lie"):
        fit_height_change(np.array([0, 1, 5]), *ok[1:], np.zeros(3, dtype=int), 5)
    with pytest.raises(ValueError, match="h has non-finite"):
        fit_height_change(*ok[:4], np.array([0, np.nan, 0]), ok[0], 1)
    with pytest.raises(ValueError, match="h_sigma must be positive"):
        fit_height_change(*ok, ok[0], 1, h_sigma=np.zeros(3))
    with pytest.raises(ValueError, match="one 1-D shape"):
        fit_height_change(*ok, np.zeros(2, dtype=int), 1)
    with pytest.raises(ValueError, match="min_points"):
        FitOptions(min_points=3)
    with pytest.raises(ValueError, match="timezone-aware"):
        years_since(np.zeros(1), datetime(2024, 1, 1))


def test_t_quantile_matches_tabulated_values():
    # Student's t table, 97.5 %: 2.447 (6), 2.228 (10), 2.042 (30), 1.984 (100).
    np.testing.assert_allclose(
        t_quantile_975([6, 10, 30, 100]), [2.447, 2.228, 2.042, 1.984], atol=2e-3
    )


def test_years_since_counts_julian_years_from_the_atlas_epoch():
    epoch = datetime(2024, 1, 1, tzinfo=UTC)
    delta_time = np.array([0.0, 1e8])
    expected = (ATLAS_EPOCH_UTC_S + delta_time - epoch.timestamp()) / (365.25 * 86400)
    np.testing.assert_allclose(years_since(delta_time, epoch), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("centre_lat, epsg", [(-75.5, 3031), (72.0, 3413)])
def test_cell_offsets_are_polar_stereographic_distances(centre_lat, epsg):
    rng = np.random.default_rng(0)
    lat = centre_lat + rng.uniform(-0.01, 0.01, 50)
    lon = 40.0 + rng.uniform(-0.03, 0.03, 50)
    clat, clon = np.full(50, centre_lat), np.full(50, 40.0)
    x, y = cell_offsets(lat, lon, clat, clon)
    scale = Proj(f"EPSG:{epsg}").get_factors(40.0, centre_lat).meridional_scale
    _, _, metres = Geod(ellps="WGS84").inv(clon, clat, lon, lat)  # geodesic distance
    np.testing.assert_allclose(np.hypot(x, y), scale * metres, rtol=1e-4)
    with pytest.raises(ValueError, match="one shape"):
        cell_offsets(lat, lon, clat[:3], clon)


# --- the multi-cycle sample ---------------------------------------------------------


@pytest.fixture(scope="module")
def sample_points(tmp_path_factory):
    """Good points of the three-cycle sample (40 m spacing, for speed), read with h5py."""
    cycles = write_cycles(tmp_path_factory.mktemp("cycles"), spacing_m=40.0)
    columns = []
    for granules in cycles.values():
        for granule in granules:
            with h5py.File(granule.path, "r") as f:
                cycle = int(f["orbit_info/cycle_number"][0])
                for beam in (b for b in BEAMS if b in f):
                    g = f[beam]["land_ice_segments"]
                    h, sigma = g["h_li"][:], g["h_li_sigma"][:]
                    good = (g["atl06_quality_summary"][:] == 0) & (h != FILL) & (sigma != FILL)
                    columns.append(
                        np.column_stack(
                            [
                                g["latitude"][:][good],
                                g["longitude"][:][good],
                                h[good],
                                sigma[good],
                                g["delta_time"][:][good],
                                np.full(good.sum(), cycle),
                            ]
                        )
                    )
    lat, lon, h, sigma, delta_time, cycle = np.concatenate(columns).T
    cell = healpy.ang2pix(NSIDE, lon, mortie.geodetic_to_authalic(lat), nest=True, lonlat=True)
    cells, child = np.unique(cell, return_inverse=True)
    centre_lon, centre_lat_authalic = healpy.pix2ang(NSIDE, cells, nest=True, lonlat=True)
    centre_lat = mortie.authalic_to_geodetic(centre_lat_authalic)
    to_map = Transformer.from_crs("EPSG:4326", "EPSG:3031", always_xy=True)
    px, py = to_map.transform(lon, lat)
    cx, cy = to_map.transform(centre_lon[child], centre_lat[child])
    t = (delta_time + ATLAS_EPOCH_UTC_S - PLANTED_EPOCH.timestamp()) / (365.25 * 86400)
    return {
        "child": child,
        "x": px - cx,
        "y": py - cy,
        "t": t,
        "h": h,
        "cycle": cycle.astype(np.int64),
        "h_sigma": sigma,
        "lat": lat,
        "lon": lon,
        "delta_time": delta_time,
        "n_children": cells.size,
        "centre": (centre_lat, centre_lon),
    }


@pytest.fixture(scope="module")
def sample_fit(sample_points):
    p = sample_points
    return fit_height_change(
        p["child"], p["x"], p["y"], p["t"], p["h"], p["cycle"], p["n_children"],
        h_sigma=p["h_sigma"],
    )  # fmt: skip


def uniform_truth(p):
    """Planted dh/dt per child, and whether it is the same at every point of the child."""
    rate = planted_dhdt(p["lat"], p["lon"])
    low = np.full(p["n_children"], np.inf)
    high = np.full(p["n_children"], -np.inf)
    np.minimum.at(low, p["child"], rate)
    np.maximum.at(high, p["child"], rate)
    return low, low == high


def test_sample_fit_equals_per_child_lstsq(sample_points, sample_fit):
    p = sample_points
    rate, _ = uniform_truth(p)
    rng = np.random.default_rng(0)
    glacier = np.flatnonzero(rate == GLACIER_DHDT)
    chosen = np.union1d(
        rng.choice(glacier, 60, replace=False), rng.choice(p["n_children"], 140, replace=False)
    )
    rows = np.isin(p["child"], chosen)
    expected = oracle_fit(
        p["child"][rows], p["x"][rows], p["y"][rows], p["t"][rows], p["h"][rows].astype(float),
        p["cycle"][rows], p["n_children"], FitOptions(), h_sigma=p["h_sigma"][rows].astype(float),
    )  # fmt: skip
    assert np.isfinite(expected["dhdt"][chosen]).mean() > 0.8
    assert_matches_oracle(sample_fit, expected, chosen)
    # The fit recovers the planted surface too: h0 is the height at the centre at PLANTED_EPOCH.
    fitted = chosen[np.isfinite(expected["h0"][chosen])]
    centre_lat, centre_lon = p["centre"]
    surface = planted_height(centre_lat[fitted], centre_lon[fitted], PLANTED_EPOCH_DELTA_TIME)
    assert np.median(np.abs(sample_fit["h0"][fitted] - surface)) < 0.05


PLANTED_EPOCH_DELTA_TIME = PLANTED_EPOCH.timestamp() - ATLAS_EPOCH_UTC_S


def test_planted_rate_is_recovered_within_its_standard_error(sample_points, sample_fit):
    rate, uniform = uniform_truth(sample_points)
    fitted = np.isfinite(sample_fit["dhdt"]) & uniform
    assert fitted.sum() > 2000
    error = np.abs(sample_fit["dhdt"][fitted] - rate[fitted])
    se = sample_fit["dhdt_se"][fitted]
    within_1 = np.mean(error <= se)
    within_2 = np.mean(error <= 2 * se)
    # The 95 % interval of a least-squares estimate with n - 4 degrees of freedom.
    within_95 = np.mean(error <= t_quantile_975(sample_fit["n_points"][fitted] - 4) * se)
    print(
        f"{fitted.sum()} cells: {within_1:.1%} within 1 SE, {within_2:.1%} within 2 SE, "
        f"{within_95:.1%} within the t 95 % interval"
    )
    # A calibrated SE holds the truth ~68 % of the time within 1 SE, ~95 % within 2 SE: both
    # are fractions of a finite set of cells, so allow 3 binomial standard errors below 95 %
    # (~0.7 % here); an SE 10 % too small would put 2 SE at ~93 %, 10 % too large at ~97 %.
    allowance = 3 * np.sqrt(0.95 * 0.05 / fitted.sum())
    assert 0.62 <= within_1 <= 0.74
    assert within_2 >= 0.95 - allowance and within_95 >= 0.95 - allowance
    assert within_2 <= 0.975, "an inflated SE would contain the truth too often"


def test_differencing_cell_means_is_biased_where_the_surface_is_steep(sample_points, sample_fit):
    p = sample_points
    rate, uniform = uniform_truth(p)
    # The same blunder-free points for both methods: drop those metres off the planted height.
    clean = np.abs(p["h"] - planted_height(p["lat"], p["lon"], p["delta_time"])) < 2.0
    first, last = p["cycle"] == p["cycle"].min(), p["cycle"] == p["cycle"].max()

    def per_child_mean(values, rows):
        n = np.bincount(p["child"][rows], minlength=p["n_children"])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.bincount(p["child"][rows], values[rows], minlength=p["n_children"]) / n

    h_first, h_last = per_child_mean(p["h"], clean & first), per_child_mean(p["h"], clean & last)
    t_first, t_last = per_child_mean(p["t"], clean & first), per_child_mean(p["t"], clean & last)
    differenced = (h_last - h_first) / (t_last - t_first)
    glacier = uniform & np.isfinite(sample_fit["dhdt"]) & np.isfinite(differenced)
    glacier &= rate == GLACIER_DHDT
    slope = np.hypot(sample_fit["slope_x"], sample_fit["slope_y"])[glacier]
    mean_error = np.median(np.abs(differenced[glacier] - GLACIER_DHDT))
    fit_error = np.median(np.abs(sample_fit["dhdt"][glacier] - GLACIER_DHDT))
    print(
        f"glacier: {glacier.sum()} cells, median slope {np.median(slope):.3f}; median |error| "
        f"of differenced means {mean_error:.3f} m/yr, of the plane fit {fit_error:.4f} m/yr"
    )
    assert np.median(slope) > 0.02
    assert mean_error > 10 * fit_error
    assert mean_error > 0.1
