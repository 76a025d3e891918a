"""A run's summary, per-cell table and markdown, checked against hand-computed numbers."""

from __future__ import annotations

import pytest

from magg_core.report.summary import cell_table, summarize, to_markdown
from magg_core.schema import CellResult, GranuleFailure, Timings

ARM64_USD_PER_GB_S = 0.0000133334
X86_USD_PER_GB_S = 0.0000166667
USD_PER_REQUEST = 0.20 / 1e6
"""AWS Lambda's published on-demand prices (us-west-2, first tier)."""


def results() -> list[CellResult]:
    return [
        CellResult(
            parent_morton=30,
            status="ok",
            cells_with_data=100,
            total_obs=5000,
            granule_count=3,
            files_processed=2,
            files_failed=[GranuleFailure("s3://b/g3.h5", "not an HDF5 file")],
            duration_s=Timings(read=6.0, aggregate=1.0, write=3.0, total=10.5),
            peak_rss_mb=300.0,
            dropped={"quality": 700, "fill": 40, "sigma": 2},
        ),
        CellResult(
            parent_morton=10,
            status="empty",
            granule_count=1,
            files_processed=1,
            duration_s=Timings(read=4.0, aggregate=0.0, write=0.0, total=4.5),
            peak_rss_mb=500.0,
            dropped={"quality": 1200, "fill": 0, "sigma": 0},
        ),
        CellResult(parent_morton=20, status="no_granules"),
    ]


def test_totals_count_cells_that_failed_without_a_result():
    summary = summarize(results(), failed=2, wall_s=10.0, lambda_memory_mb=1024)

    assert summary.cells == 5
    assert summary.status_counts == {"ok": 1, "empty": 1, "no_granules": 1, "failed": 2}
    assert summary.failed == 2
    assert (summary.total_obs, summary.cells_with_data) == (5000, 100)
    assert (summary.granules_read, summary.granules_failed) == (3, 1)
    assert (summary.read_s, summary.aggregate_s, summary.write_s) == (10.0, 1.0, 3.0)
    assert summary.cell_seconds == 15.0
    assert summary.peak_rss_mb == 500.0
    assert summary.dropped == {"quality": 1900, "fill": 40, "sigma": 2}
    assert summary.cells_per_second == 0.5 and summary.obs_per_second == 500.0
    assert summary.one_line() == (
        "5 cells (empty 1, failed 2, no_granules 1, ok 1), 5,000 observations in 10.0 s"
    )
    assert summary.one_line("parents", "points fitted").startswith("5 parents (")


@pytest.mark.parametrize(
    ("architecture", "price"), [("arm64", ARM64_USD_PER_GB_S), ("x86_64", X86_USD_PER_GB_S)]
)
def test_lambda_cost_is_gb_seconds_at_the_architectures_price_plus_requests(architecture, price):
    summary = summarize(
        results(), wall_s=1.0, lambda_memory_mb=3072, lambda_architecture=architecture
    )
    assert summary.lambda_gb_seconds == 15.0 * 3
    assert summary.lambda_cost_usd == pytest.approx(45.0 * price + 3 * USD_PER_REQUEST, rel=1e-12)


def test_an_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="'riscv'"):
        summarize(results(), wall_s=1.0, lambda_architecture="riscv")


def test_the_table_has_one_row_per_cell_in_parent_order_failures_included():
    rows = cell_table(results(), {25: "PermissionDeniedError: Access Denied"})

    assert [r["parent_morton"] for r in rows] == ["10", "20", "25", "30"]
    assert len({tuple(r) for r in rows}) == 1  # the same columns in every row
    by_parent = {r["parent_morton"]: r for r in rows}
    assert by_parent["25"]["status"] == "failed"
    assert by_parent["25"]["error"] == "PermissionDeniedError: Access Denied"
    assert by_parent["30"] == {
        "parent_morton": "30",
        "status": "ok",
        "obs": 5000,
        "dropped_quality": 700,
        "dropped_fill": 40,
        "dropped_sigma": 2,
        "child_cells": 100,
        "granules_ok": 2,
        "granules_failed": 1,
        "seconds": 10.5,
        "peak_mb": 300.0,
        "error": "s3://b/g3.h5: not an HDF5 file",
    }


def test_markdown_shows_totals_throughput_and_cost():
    summary = summarize(results(), failed=1, wall_s=8.0, lambda_memory_mb=2048)
    text = to_markdown(summary, title="magg run into s3://out/x.zarr")

    assert text.startswith("# magg run into s3://out/x.zarr\n")
    lines = set(text.splitlines())
    assert "| cells | 4 (empty: 1, failed: 1, no_granules: 1, ok: 1) |" in lines
    assert "| observations | 5,000 in 100 child cells |" in lines
    assert "| points left out | 1,942 dropped: quality 1,900, fill 40, sigma 2 |" in lines
    assert "| granules in cells | 3 read, 1 failed |" in lines
    assert "| wall time | 8.0 s (0.50 cells/s, 625 obs/s) |" in lines
    assert "| cell time | 15.0 s: read 71 %, aggregate 7 %, write 21 % |" in lines
    assert "| peak memory | 500 MiB |" in lines
    cost = 30.0 * ARM64_USD_PER_GB_S + 4 * USD_PER_REQUEST
    assert (
        f"| Lambda cost estimate | ${cost:.4f}: 30.0 GB-s at 2048 MB arm64 + 4 requests |" in lines
    )


def test_markdown_without_the_lambda_cost_and_with_a_flows_own_rows():
    summary = summarize(results(), failed=1, wall_s=8.0, lambda_memory_mb=2048)
    full = to_markdown(summary).splitlines()
    text = to_markdown(summary, lambda_cost=False, rows=[("reference epoch t0", "2019-01-01")])
    lines = text.splitlines()
    assert not any("Lambda" in line for line in lines)
    assert lines[-1] == "| reference epoch t0 | 2019-01-01 |"
    assert lines[:-1] == [line for line in full if "Lambda" not in line]


def test_an_empty_run_still_summarizes():
    summary = summarize([], wall_s=0.0)
    assert summary.cells == 0 and summary.cells_per_second == 0.0
    assert "| cells | 0 (none) |" in to_markdown(summary)
    assert "| points left out | none dropped |" in to_markdown(summary)
