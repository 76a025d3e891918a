"""What a run did, in numbers a glaciologist and a budget holder both read.

Pure functions from per-cell results to a summary, a table and markdown; the
flow turns them into Prefect artifacts and the CLI prints the same text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from magg_core.schema import DROP_REASONS, CellResult

LAMBDA_PRICE_PER_GB_S = {"arm64": 0.0000133334, "x86_64": 0.0000166667}
"""AWS Lambda on-demand compute price (USD per GB-second, us-west-2, first tier)."""
LAMBDA_PRICE_PER_REQUEST = 0.20 / 1_000_000


@dataclass(frozen=True)
class RunSummary:
    """Totals over a run's cells; ``status_counts`` includes cells that raised (``failed``)."""

    cells: int
    status_counts: dict[str, int]
    total_obs: int
    cells_with_data: int
    granules_read: int
    granules_failed: int
    wall_s: float
    cell_seconds: float
    read_s: float
    aggregate_s: float
    write_s: float
    peak_rss_mb: float
    lambda_memory_mb: int
    lambda_architecture: str
    dropped: dict[str, int] = field(default_factory=dict)
    """Points inside the cells left out of the statistics, by filter
    (:attr:`magg_core.schema.CellResult.dropped`)."""

    @property
    def failed(self) -> int:
        return self.status_counts.get("failed", 0)

    def one_line(self, cells: str = "cells", points: str = "observations") -> str:
        """E.g. ``19 cells (ok 18, partial 1), 1,093,337 observations in 27.9 s``."""
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.status_counts.items()))
        return (
            f"{self.cells} {cells} ({statuses}), {self.total_obs:,} {points} in {self.wall_s:.1f} s"
        )

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def obs_per_second(self) -> float:
        return self.total_obs / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def lambda_gb_seconds(self) -> float:
        """Compute these cells would bill as Lambda invocations at the configured memory."""
        return self.cell_seconds * self.lambda_memory_mb / 1024

    @property
    def lambda_cost_usd(self) -> float:
        """GB-seconds at the architecture's price, plus the per-request charge."""
        price = LAMBDA_PRICE_PER_GB_S[self.lambda_architecture]
        return self.lambda_gb_seconds * price + self.cells * LAMBDA_PRICE_PER_REQUEST


def summarize(
    results: Sequence[CellResult],
    *,
    failed: int = 0,
    wall_s: float,
    lambda_memory_mb: int = 2048,
    lambda_architecture: str = "arm64",
) -> RunSummary:
    """Totals over the cells that returned a result, plus ``failed`` cells that did not.

    A cell whose task failed has no :class:`CellResult` to add up (it raised),
    but it still counts as a cell of the run, with status ``failed``.
    """
    if lambda_architecture not in LAMBDA_PRICE_PER_GB_S:
        raise ValueError(
            f"lambda_architecture must be one of {sorted(LAMBDA_PRICE_PER_GB_S)}, "
            f"got {lambda_architecture!r}"
        )
    status_counts = Counter(r.status for r in results)
    dropped: Counter[str] = Counter()
    for r in results:
        dropped.update(r.dropped)
    if failed:
        status_counts["failed"] += failed
    return RunSummary(
        cells=len(results) + failed,
        status_counts=dict(status_counts),
        total_obs=sum(r.total_obs for r in results),
        cells_with_data=sum(r.cells_with_data for r in results),
        granules_read=sum(r.files_processed for r in results),
        granules_failed=sum(len(r.files_failed) for r in results),
        wall_s=wall_s,
        cell_seconds=sum(r.duration_s.total for r in results),
        read_s=sum(r.duration_s.read for r in results),
        aggregate_s=sum(r.duration_s.aggregate for r in results),
        write_s=sum(r.duration_s.write for r in results),
        peak_rss_mb=max((r.peak_rss_mb for r in results), default=0.0),
        lambda_memory_mb=lambda_memory_mb,
        lambda_architecture=lambda_architecture,
        dropped=dict(dropped),
    )


def describe_dropped(dropped: Mapping[str, int]) -> str:
    """E.g. ``12,041 dropped: quality 9,870, fill 2,160, sigma 11``, or ``none dropped``."""
    total = sum(dropped.values())
    if not total:
        return "none dropped"
    order = [*DROP_REASONS, *sorted(dropped.keys() - set(DROP_REASONS))]
    return f"{total:,} dropped: " + ", ".join(f"{k} {dropped.get(k, 0):,}" for k in order)


def incomplete_cells(
    results: Sequence[CellResult], failures: Mapping[int, str], *, accept_partial: bool = False
) -> list[int]:
    """The cells that keep a run from being complete, in parent order.

    Failed cells (with or without a result), and partial cells unless the run
    accepts them.
    """
    bad = set(failures)
    for r in results:
        if r.status == "failed" or (r.status == "partial" and not accept_partial):
            bad.add(r.parent_morton)
    return sorted(bad)


def cell_table(
    results: Sequence[CellResult], failures: Mapping[int, str] | None = None
) -> list[dict[str, object]]:
    """One row per cell in parent order, for the run's table artifact.

    ``failures`` are the cells whose task failed without a result (parent →
    one-line reason); they get the same columns, with nothing counted.
    """
    rows = {
        r.parent_morton: {
            "parent_morton": str(r.parent_morton),
            "status": r.status,
            "obs": r.total_obs,
            **{f"dropped_{reason}": r.dropped.get(reason, 0) for reason in DROP_REASONS},
            "child_cells": r.cells_with_data,
            "granules_ok": r.files_processed,
            "granules_failed": len(r.files_failed),
            "seconds": round(r.duration_s.total, 2),
            "peak_mb": r.peak_rss_mb,
            "error": r.error or "; ".join(f"{f.url}: {f.reason}" for f in r.files_failed[:3]),
        }
        for r in results
    }
    for parent, reason in (failures or {}).items():
        rows[parent] = {
            "parent_morton": str(parent),
            "status": "failed",
            "obs": 0,
            **{f"dropped_{reason}": 0 for reason in DROP_REASONS},
            "child_cells": 0,
            "granules_ok": 0,
            "granules_failed": 0,
            "seconds": 0.0,
            "peak_mb": 0.0,
            "error": reason,
        }
    return [rows[parent] for parent in sorted(rows)]


def to_markdown(
    summary: RunSummary,
    *,
    title: str = "magg run",
    lambda_cost: bool = True,
    rows: Sequence[tuple[str, str]] = (),
) -> str:
    """The run summary as markdown (a Prefect artifact and the CLI's output).

    ``lambda_cost``: include the Lambda cost estimate (a flow that cannot run
    on Lambda leaves it out); ``rows``: the flow's own (label, value) rows,
    after the common ones.
    """
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(summary.status_counts.items())) or "none"
    split = summary.read_s + summary.aggregate_s + summary.write_s or 1.0
    cost = (
        [
            f"| Lambda cost estimate | ${summary.lambda_cost_usd:.4f}: "
            f"{summary.lambda_gb_seconds:,.1f} GB-s at {summary.lambda_memory_mb} MB "
            f"{summary.lambda_architecture} + {summary.cells} requests |"
        ]
        if lambda_cost
        else []
    )
    return "\n".join(
        [
            f"# {title}",
            "",
            "| | |",
            "|---|---|",
            f"| cells | {summary.cells} ({statuses}) |",
            f"| observations | {summary.total_obs:,} in {summary.cells_with_data:,} child cells |",
            f"| points left out | {describe_dropped(summary.dropped)} |",
            f"| granules in cells | {summary.granules_read:,} read, "
            f"{summary.granules_failed:,} failed |",
            f"| wall time | {summary.wall_s:.1f} s ({summary.cells_per_second:.2f} cells/s, "
            f"{summary.obs_per_second:,.0f} obs/s) |",
            f"| cell time | {summary.cell_seconds:.1f} s: "
            f"read {100 * summary.read_s / split:.0f} %, "
            f"aggregate {100 * summary.aggregate_s / split:.0f} %, "
            f"write {100 * summary.write_s / split:.0f} % |",
            f"| peak memory | {summary.peak_rss_mb:.0f} MiB |",
            *cost,
            *(f"| {label} | {value} |" for label, value in rows),
        ]
    )
