"""Per-child statistics against independent oracles (pandas groupby, per-child numpy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from magg_core.config import load_config
from magg_core.stats.aggregate import aggregate

BUILTIN = load_config()
N_CHILDREN = BUILTIN.output.children_per_parent


def _uniform(rng: np.random.Generator, n_points: int, n_children: int):
    child = rng.integers(0, n_children, n_points)
    h = rng.normal(1500.0, 400.0, n_points)
    return child, h


def _clustered(rng: np.random.Generator, n_points: int, n_children: int):
    """A few busy children (skewed sizes), many single-point ones, most empty."""
    busy = rng.choice(n_children, size=n_children // 16, replace=False)
    size = rng.pareto(1.2, busy.size) + 0.05
    child = rng.choice(busy, size=n_points, p=size / size.sum())
    rest = np.setdiff1d(np.arange(n_children), busy)
    single = rng.choice(rest, size=n_children // 16, replace=False)
    child = np.concatenate([child, single])
    # Heights near 3 km that vary by centimetres: stresses variance cancellation.
    h = 3000.0 + 0.01 * rng.standard_normal(child.size)
    order = rng.permutation(child.size)
    return child[order], h[order]


def _ties(rng: np.random.Generator, n_points: int, n_children: int):
    """Heights from a few distinct values, so quantiles land between equal values."""
    child = rng.integers(0, n_children // 4, n_points)  # three quarters stay empty
    h = rng.choice(np.array([-12.5, 0.0, 0.25, 100.0, 100.0, 2500.75]), n_points)
    return child, h


def _columns(rng: np.random.Generator, h: np.ndarray) -> dict[str, np.ndarray]:
    """ATL06-like float32 columns, as the reader returns them."""
    return {
        "h_li": h.astype(np.float32),
        "h_li_sigma": rng.uniform(0.02, 0.8, h.size).astype(np.float32),
    }


def _pandas_oracle(child: np.ndarray, columns: dict, n_children: int) -> dict[str, np.ndarray]:
    """The built-in statistics computed by pandas, in float64, NaN where empty."""
    df = pd.DataFrame(
        {
            "child": child,
            "h": columns["h_li"].astype(np.float64),
            "w": 1.0 / columns["h_li_sigma"].astype(np.float64) ** 2,
        }
    )
    df["wh"] = df["w"] * df["h"]
    g = df.groupby("child")
    every = pd.RangeIndex(n_children)
    sums = g[["w", "wh"]].sum().reindex(every)
    frame = {
        "count": g.size().reindex(every, fill_value=0),
        "h_min": g["h"].min().reindex(every),
        "h_max": g["h"].max().reindex(every),
        "h_mean": sums["wh"] / sums["w"],
        "h_sigma": 1.0 / np.sqrt(sums["w"]),
        "h_variance": g["h"].var(ddof=0).reindex(every),
        "h_q25": g["h"].quantile(0.25).reindex(every),
        "h_q50": g["h"].quantile(0.50).reindex(every),
        "h_q75": g["h"].quantile(0.75).reindex(every),
    }
    return {name: series.to_numpy() for name, series in frame.items()}


EXACT = ("h_min", "h_max", "h_q25", "h_q50", "h_q75")
CLOSE = ("h_mean", "h_sigma", "h_variance")


@pytest.mark.parametrize(
    ("make", "n_points"),
    [(_uniform, 300_000), (_clustered, 200_000), (_ties, 50_000)],
    ids=["uniform", "clustered", "ties"],
)
def test_builtin_statistics_match_pandas(make, n_points):
    rng = np.random.default_rng(sum(map(ord, make.__name__)))
    child, h = make(rng, n_points, N_CHILDREN)
    columns = _columns(rng, h)
    stats = aggregate(child, columns, BUILTIN)
    expected = _pandas_oracle(child, columns, N_CHILDREN)

    assert list(stats) == [s.name for s in BUILTIN.aggregation.statistics]
    empty = expected["count"] == 0
    assert empty.any() or make is _uniform
    assert stats["count"].dtype == np.int32
    np.testing.assert_array_equal(stats["count"], expected["count"].astype(np.int32))
    for name in EXACT + CLOSE:
        assert stats[name].dtype == np.float32, name
        assert stats[name].shape == (N_CHILDREN,), name
        assert np.isnan(stats[name][empty]).all(), name
        assert not np.isnan(stats[name][~empty]).any(), name
    for name in EXACT:
        np.testing.assert_array_equal(stats[name], expected[name].astype(np.float32), err_msg=name)
    for name in CLOSE:
        np.testing.assert_allclose(
            stats[name], expected[name].astype(np.float32), rtol=1e-6, err_msg=name
        )


def test_single_point_children():
    child = np.array([5, 9, 9, 4095])
    columns = {
        "h_li": np.array([10.0, 1.0, 3.0, -7.5], dtype=np.float32),
        "h_li_sigma": np.array([0.5, 1.0, 1.0, 2.0], dtype=np.float32),
    }
    stats = aggregate(child, columns, BUILTIN)
    for name in ("h_min", "h_max", "h_mean", "h_q25", "h_q50", "h_q75"):
        assert stats[name][5] == 10.0 and stats[name][4095] == -7.5, name
    assert stats["h_sigma"][5] == 0.5 and stats["h_sigma"][4095] == 2.0
    assert stats["h_variance"][5] == 0.0 and stats["h_variance"][9] == 1.0
    assert stats["h_q25"][9] == 1.5 and stats["h_q50"][9] == 2.0 and stats["h_q75"][9] == 2.5
    assert stats["count"].sum() == 4 and stats["count"][9] == 2
    assert np.count_nonzero(stats["count"]) == 3


def test_empty_input_gives_fill_everywhere():
    empty = np.array([], dtype=np.float32)
    stats = aggregate(np.array([], dtype=np.int64), {"h_li": empty, "h_li_sigma": empty}, BUILTIN)
    for stat in BUILTIN.aggregation.statistics:
        out = stats[stat.name]
        assert out.dtype == stat.dtype and out.shape == (N_CHILDREN,)
        np.testing.assert_array_equal(out, np.full(N_CHILDREN, stat.fill_value, stat.dtype))


def _numpy_per_child(child: np.ndarray, values: np.ndarray, reduce) -> np.ndarray:
    """The reference: a plain loop calling numpy on each non-empty child, in order."""
    order = np.argsort(child, kind="stable")
    bounds = np.flatnonzero(np.diff(child[order])) + 1
    with np.errstate(invalid="ignore"):  # numpy's lerp warns on inf - inf
        return np.array([reduce(part) for part in np.split(values[order], bounds)])


QUANTILES = (0.0, 0.01, 0.25, 1 / 3, 0.5, 0.75, 0.9, 0.999, 1.0)


def _order_config(column: str):
    raw = BUILTIN.to_dict()
    raw["aggregation"]["columns"]["third"] = "h_li / 3"  # not float32-exact: general sort
    stats = {
        "lo": {"function": "min", "column": column},
        "hi": {"function": "max", "column": column},
        **{
            f"q{i}": {"function": "quantile", "column": column, "q": q}
            for i, q in enumerate(QUANTILES)
        },
    }
    for spec in stats.values():
        spec.update(dtype="float64", fill_value="nan")
    raw["aggregation"]["statistics"] = stats
    return load_config(raw)


@pytest.mark.parametrize("column", ["h_li", "third"])
def test_order_statistics_are_bit_identical_to_numpy(column):
    rng = np.random.default_rng(7)
    child = rng.integers(0, 700, 40_000)
    h = rng.normal(0.0, 300.0, child.size).astype(np.float32)
    h[rng.choice(h.size, 20, replace=False)] = np.inf  # numpy's lerp turns inf - inf into nan
    h[rng.choice(h.size, 20, replace=False)] = -np.inf
    h[rng.choice(h.size, 200, replace=False)] = -0.0
    h[rng.choice(h.size, 200, replace=False)] = 0.0
    columns = {"h_li": h, "h_li_sigma": np.ones_like(h)}
    with np.testing.assert_no_warnings():
        stats = aggregate(child, columns, _order_config(column))
    values = h.astype(np.float64) / (3 if column == "third" else 1)

    present = np.unique(child)
    assert np.isnan(stats["lo"][np.setdiff1d(np.arange(N_CHILDREN), present)]).all()
    np.testing.assert_array_equal(stats["lo"][present], _numpy_per_child(child, values, np.min))
    np.testing.assert_array_equal(stats["hi"][present], _numpy_per_child(child, values, np.max))
    for i, q in enumerate(QUANTILES):
        expected = _numpy_per_child(child, values, lambda v, q=q: np.quantile(v, q))
        np.testing.assert_array_equal(stats[f"q{i}"][present], expected, err_msg=f"q={q}")


def test_nan_propagates_like_numpy_but_is_counted():
    child = np.array([0, 0, 0, 1, 1, 2])
    # A NaN with its sign bit set must still sort last, as numpy sorts it.
    h = np.array([1.0, -np.nan, 3.0, 4.0, 6.0, np.nan], dtype=np.float32)
    assert np.signbit(h[1])
    stats = aggregate(child, {"h_li": h, "h_li_sigma": np.ones_like(h)}, BUILTIN)
    np.testing.assert_array_equal(stats["count"][:3], [3, 2, 1])
    for stat in BUILTIN.aggregation.statistics:
        if stat.name in ("count", "h_sigma"):
            continue
        assert np.isnan(stats[stat.name][[0, 2]]).all(), stat.name
        assert not np.isnan(stats[stat.name][1]), stat.name
    assert stats["h_q50"][1] == 5.0 and stats["h_min"][1] == 4.0 and stats["h_max"][1] == 6.0
    assert stats["h_sigma"][0] == np.float32(1 / np.sqrt(3))  # sigma never reads h_li


def _custom_config():
    """Order 8 -> 12 (256 children), other dtypes and fills, transforms, derived columns."""
    raw = BUILTIN.with_orders(8, 12).to_dict()
    raw["aggregation"]["columns"]["depth"] = "1000 - h_li"
    raw["aggregation"]["columns"]["depth_km"] = "depth / 1000"
    raw["aggregation"]["statistics"].update(
        {
            "n": {"function": "count", "dtype": "float64", "fill_value": -1},
            "h_std": {
                "function": "variance",
                "column": "h_li",
                "transform": "sqrt(x)",
                "dtype": "float64",
                "fill_value": -9999,
            },
            "depth_sum_km": {
                "function": "sum",
                "column": "depth_km",
                "dtype": "float64",
                "fill_value": 0,
            },
            "depth_p10": {
                "function": "quantile",
                "column": "depth",
                "q": 0.1,
                "dtype": "float32",
                "fill_value": "-inf",
            },
            "h_plain_mean": {
                "function": "mean",
                "column": "h_li",
                "dtype": "float32",
                "fill_value": "nan",
            },
            "h_max_int": {
                "function": "max",
                "column": "h_li",
                "transform": "x * 100",
                "dtype": "int32",
                "fill_value": -2147483648,
            },
        }
    )
    return load_config(raw)


def test_custom_config_with_other_orders_and_transforms():
    cfg = _custom_config()
    n = cfg.output.children_per_parent
    assert n == 256
    rng = np.random.default_rng(11)
    child, h = _clustered(rng, 20_000, n)
    columns = _columns(rng, h)
    stats = aggregate(child, columns, cfg)

    df = pd.DataFrame({"child": child, "h": columns["h_li"].astype(np.float64)})
    df["depth"] = 1000 - df["h"]
    g = df.groupby("child")
    every = pd.RangeIndex(n)
    empty = ~np.isin(np.arange(n), child)
    assert empty.sum() > n // 2

    expected_builtin = _pandas_oracle(child, columns, n)
    np.testing.assert_array_equal(stats["h_q50"], expected_builtin["h_q50"].astype(np.float32))
    np.testing.assert_array_equal(stats["n"], np.where(empty, -1.0, expected_builtin["count"]))
    std = g["h"].std(ddof=0).reindex(every, fill_value=-9999).to_numpy()
    np.testing.assert_allclose(stats["h_std"], std, rtol=1e-6)
    km = (g["depth"].sum() / 1000).reindex(every, fill_value=0).to_numpy()
    np.testing.assert_allclose(stats["depth_sum_km"], km, rtol=1e-9)
    p10 = g["depth"].quantile(0.1).reindex(every, fill_value=-np.inf).to_numpy()
    np.testing.assert_array_equal(stats["depth_p10"], p10.astype(np.float32))
    mean = g["h"].mean().reindex(every).to_numpy().astype(np.float32)
    np.testing.assert_allclose(stats["h_plain_mean"], mean, rtol=1e-6)
    max_cm = (g["h"].max() * 100).reindex(every).to_numpy()
    np.testing.assert_array_equal(stats["h_max_int"][~empty], max_cm[~empty].astype(np.int32))
    assert (stats["h_max_int"][empty] == -2147483648).all()

    for stat in cfg.aggregation.statistics:
        assert stats[stat.name].dtype == stat.dtype, stat.name
        assert stats[stat.name].shape == (n,), stat.name


def test_input_columns_are_not_modified():
    rng = np.random.default_rng(3)
    child, h = _uniform(rng, 1000, N_CHILDREN)
    columns = _columns(rng, h)
    before = {k: v.copy() for k, v in columns.items()}
    child_before = child.copy()
    aggregate(child, columns, BUILTIN)
    np.testing.assert_array_equal(child, child_before)
    for name in columns:
        np.testing.assert_array_equal(columns[name], before[name])


@pytest.mark.parametrize(
    ("child", "columns", "message"),
    [
        (np.array([0, 4096]), None, r"must lie in \[0, 4096\), got values from 0 to 4096"),
        (np.array([-1, 3]), None, r"must lie in \[0, 4096\)"),
        (np.array([0.0, 1.0]), None, r"1-D integer array, got float64"),
        (np.zeros((2, 1), dtype=int), None, r"1-D integer array, got int64 of shape \(2, 1\)"),
        (np.array([0, 1]), {"h_li": np.zeros(2)}, r"needs column\(s\) \['h_li_sigma'\]"),
        (
            np.array([0, 1]),
            {"h_li": np.zeros(3), "h_li_sigma": np.ones(2)},
            r"column 'h_li' has shape \(3,\), expected \(2,\)",
        ),
    ],
)
def test_bad_input_is_rejected(child, columns, message):
    columns = columns or {"h_li": np.zeros(child.shape[0]), "h_li_sigma": np.ones(child.shape[0])}
    with pytest.raises(ValueError, match=message):
        aggregate(child, columns, BUILTIN)
