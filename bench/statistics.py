"""Statistics: :func:`magg_core.stats.aggregate.aggregate` against a naive per-child loop.

The baseline is what a straightforward implementation does: for each of the
4,096 children of a parent, select its points with a boolean mask over all
points (``child == c``) and call numpy on them -- ``min``, ``max``, a weighted
mean, ``1/sqrt(sum w)``, ``var`` and ``quantile`` -- exactly the built-in
``atl06`` statistics, in float64. It is not a strawman written to lose: each
per-child call is vectorized numpy; what it lacks is a way to avoid 4,096
passes over every point.

Both run on the same points, and their results are compared. Times are CPU
time of this thread (both are single-threaded): on a shared machine, wall
time would also count the moments other jobs held the cores, which varies
from one second to the next and would blur a ratio of a 20 ms run to a
2 s one.
Distributions: ``uniform`` (every child equally likely, points in random
order) and ``track`` (six beams of ICESat-2-like tracks crossing the parent,
points in along-track order as a reader returns them: children hold runs of
~75 points, many children are empty at 300k points). Target (docs/architecture.md §Targets):
>= 100x.
"""

from __future__ import annotations

import time

import numpy as np

from bench._common import machine, median_time, parser, ratio_line
from magg_core.config import PipelineConfig, load_config
from magg_core.stats.aggregate import aggregate

SIDE = 64
"""Children per side of a parent (4**6 = 64 x 64 at orders 6 -> 12)."""
POINTS_PER_CHILD_WIDTH = 75
"""A child is ~1.5 km across; ATL06 segments are 20 m apart."""


def uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, SIDE * SIDE, n)


def track(rng: np.random.Generator, n: int) -> np.ndarray:
    """Child indices of points along straight six-beam tracks crossing the parent, in order.

    Positions are in child units on the parent's 64 x 64 grid; a nested
    HEALPix child index interleaves the bits of its two grid coordinates.
    """
    beams = np.array([-2.2, -2.16, 0.0, 0.04, 2.2, 2.24])  # pairs 3.3 km apart, 90 m within
    parts, total = [], 0
    while total < n:
        start = rng.uniform(0, SIDE, 2)
        angle = rng.uniform(0, np.pi)
        along = np.array([np.cos(angle), np.sin(angle)])
        across = np.array([-along[1], along[0]])
        t = np.arange(-1.5 * SIDE, 1.5 * SIDE, 1 / POINTS_PER_CHILD_WIDTH)
        for offset in beams:
            xy = start + np.outer(t, along) + offset * across
            xy = xy[np.all((xy >= 0) & (xy < SIDE), axis=1)].astype(np.int64)
            parts.append(_interleave(xy[:, 0], xy[:, 1]))
            total += len(xy)
    return np.concatenate(parts)[:n]


def _interleave(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    index = np.zeros_like(x)
    for bit in range(6):
        index |= ((x >> bit) & 1) << (2 * bit) | ((y >> bit) & 1) << (2 * bit + 1)
    return index


def per_child_loop(
    child: np.ndarray, h_li: np.ndarray, sigma: np.ndarray, config: PipelineConfig
) -> dict[str, np.ndarray]:
    """The baseline: one boolean mask over all points per child, then numpy on its points."""
    n_children = config.output.children_per_parent
    stats = {
        s.name: np.full(n_children, s.fill_value, s.dtype) for s in config.aggregation.statistics
    }
    for c in range(n_children):
        mask = child == c
        h = h_li[mask].astype(np.float64)
        if h.size == 0:
            continue
        w = 1.0 / sigma[mask].astype(np.float64) ** 2
        stats["count"][c] = h.size
        stats["h_min"][c] = h.min()
        stats["h_max"][c] = h.max()
        stats["h_mean"][c] = np.sum(w * h) / np.sum(w)
        stats["h_sigma"][c] = 1.0 / np.sqrt(np.sum(w))
        stats["h_variance"][c] = np.var(h)
        stats["h_q25"][c], stats["h_q50"][c], stats["h_q75"][c] = np.quantile(h, [0.25, 0.5, 0.75])
    return stats


def run(name: str, child: np.ndarray, config: PipelineConfig, repeats: int) -> float:
    rng = np.random.default_rng(1)
    h_li = (3000.0 + rng.normal(0.0, 5.0, child.size)).astype(np.float32)
    sigma = rng.uniform(0.02, 0.5, child.size).astype(np.float32)
    columns = {"h_li": h_li, "h_li_sigma": sigma}
    cpu = time.thread_time  # both are single-threaded; see module doc
    ours_s, ours = median_time(lambda: aggregate(child, columns, config), repeats, cpu)
    naive_s, naive = median_time(lambda: per_child_loop(child, h_li, sigma, config), 1, cpu)
    for stat, value in naive.items():
        np.testing.assert_allclose(ours[stat], value, rtol=1e-6, err_msg=stat)
    present = np.count_nonzero(ours["count"])
    ratio = naive_s / ours_s
    print(
        f"  {name:>16}: ours {ours_s * 1000:8.1f} ms ({ours_s * 1e9 / child.size:5.0f} ms per 1M "
        f"points), per-child loop {naive_s:7.2f} s, {present} children with points"
    )
    return ratio


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    sizes = (30_000,) if args.quick else (300_000, 3_000_000)
    config = load_config("atl06")
    print(f"statistics benchmark on {machine()}")
    print("  baseline: per child, a boolean mask over all points, then numpy (see module doc)")
    rng = np.random.default_rng(0)
    for n in sizes:
        for kind, make in (("uniform", uniform), ("track", track)):
            ratio = run(f"{kind} {n:,}", make(rng, n), config, repeats=5)
            ratio_line(f"statistics.{kind}_{n}", ratio, 100, at_least=True)


if __name__ == "__main__":
    main()
