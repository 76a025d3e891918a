"""``process-cycle`` on the local backend, end to end: output, tracking, dry run, demo.

The sample's granules are read from moto S3 and the store is written there,
through the flow as a user runs it, against a real Prefect server; the store
is compared with the independent oracle (h5py + healpy + pandas).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from magg.flows.cli import main
from magg.flows.process_cycle import process_cycle
from magg_core.catalog.catalog import load_catalog
from magg_core.report.summary import LAMBDA_PRICE_PER_GB_S, LAMBDA_PRICE_PER_REQUEST
from tests.flow_support import (
    Sample,
    assert_store_matches_oracle,
    cell_task_runs,
    flow_run_artifacts,
    local_run_fixture,  # noqa: F401 - the shared ``local_run`` fixture
    records_by_parent,
)
from tests.oracle import reference_statistics

REPO_ROOT = Path(__file__).resolve().parents[2]


def oracle_obs(sample: Sample, parent: int) -> int:
    expected = sample.oracle.get(parent)
    return 0 if expected is None else int(expected["count"].sum())


def test_the_store_equals_the_oracle(local_run, s3_env):
    sample = local_run.sample
    assert_store_matches_oracle(local_run.store, sample)

    records = records_by_parent(local_run.store)
    assert set(records) == set(sample.parents)
    for parent, record in records.items():
        result = record.result
        assert result.total_obs == oracle_obs(sample, parent)
        assert result.status == ("ok" if result.total_obs else "empty")
        assert result.files_processed == len(sample.catalog.cells[parent])
        assert result.files_failed == []


def test_every_cell_is_tracked_in_prefect(local_run):
    sample = local_run.sample
    runs = {int(r.name.removeprefix("cell-")): r for r in cell_task_runs(local_run.flow_run_id)}
    assert set(runs) == set(sample.parents)
    assert all(r.state.is_completed() and r.run_count == 1 for r in runs.values())

    artifacts = flow_run_artifacts(local_run.flow_run_id)
    assert artifacts["magg-cells-progress"].data == 100.0
    rows = json.loads(artifacts["magg-cells"].data)
    assert [int(r["parent_morton"]) for r in rows] == sample.parents
    for row in rows:
        parent = int(row["parent_morton"])
        assert row["obs"] == oracle_obs(sample, parent)
        assert row["granules_ok"] == len(sample.catalog.cells[parent])
        assert row["granules_failed"] == 0 and row["error"] == ""
        assert row["seconds"] > 0 and row["peak_mb"] > 0

    summary = local_run.summary
    total = sum(oracle_obs(sample, p) for p in sample.parents)
    assert summary["cells"] == len(sample.parents) and summary["failed_cells"] == []
    assert summary["total_obs"] == total
    assert summary["cell_seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.1)
    markdown = artifacts["magg-summary"].data
    assert markdown == summary["markdown"]
    statuses = {"ok": sum(1 for p in sample.parents if oracle_obs(sample, p))}
    statuses["empty"] = len(sample.parents) - statuses["ok"]
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()) if v)
    granules = sum(len(sample.catalog.cells[p]) for p in sample.parents)
    assert f"| cells | {len(sample.parents)} ({counts}) |" in markdown
    assert f"| observations | {total:,} in" in markdown
    assert f"| granules in cells | {granules} read, 0 failed |" in markdown
    gb_s = summary["cell_seconds"] * 2048 / 1024
    cost = gb_s * LAMBDA_PRICE_PER_GB_S["arm64"] + len(rows) * LAMBDA_PRICE_PER_REQUEST
    assert f"${cost:.4f}: {gb_s:,.1f} GB-s at 2048 MB arm64" in markdown


def test_dry_run_plans_without_writing(local_run, s3_env):
    sample = local_run.sample
    store = "s3://magg-e2e-out/dry-run.zarr"

    plan = process_cycle(
        catalog=str(sample.catalog_path),
        store=store,
        credentials="none",
        max_cells=3,
        dry_run=True,
    )

    assert plan == {"store": store, "cells": [str(p) for p in sample.parents[:3]], "dry_run": True}
    listed = s3_env.client.list_objects_v2(Bucket="magg-e2e-out", Prefix="dry-run.zarr")
    assert listed["KeyCount"] == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1, got 0"),
        ({"cell_timeout_s": 3600}, "cell_timeout_s must be between 1 and 900"),
        ({"cells": ["123"]}, "cells not in the catalog: 123"),
    ],
)
def test_bad_parameters_fail_before_the_store_is_touched(local_run, s3_env, bad, message):
    with pytest.raises(ValueError, match=message):
        process_cycle(
            catalog=str(local_run.sample.catalog_path),
            store="s3://magg-e2e-out/never.zarr",
            credentials="none",
            **bad,
        )
    listed = s3_env.client.list_objects_v2(Bucket="magg-e2e-out", Prefix="never.zarr")
    assert listed["KeyCount"] == 0


def test_magg_run_prints_the_summary_of_a_run_with_failed_cells(local_run, tmp_path, capsys):
    empty = tmp_path / "empty-mirror"  # exists (a missing one is refused up front): no granules
    empty.mkdir()
    code = main(
        ["run", "--catalog", str(local_run.sample.catalog_path), "--max-cells", "2"]
        + ["--store", str(tmp_path / "out.zarr"), "--credentials", "none"]
        + ["--granule-mirror", str(empty)]
    )

    assert code == 1
    out = capsys.readouterr().out
    assert "| cells | 2 (failed: 2) |" in out and "**2 cells incomplete**" in out


def test_demo_runs_from_a_fresh_clone(tmp_path):
    """The README's first command, in a clone of the committed tree, with a fresh Prefect home."""
    clone = tmp_path / "magg"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        PYTHONPATH=str(clone),  # ahead of the editable install: the clone's code runs
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    magg = shutil.which("magg", path=str(Path(sys.executable).parent))
    assert magg is not None

    done = subprocess.run(
        [magg, "demo"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr[-3000:]
    demo = workdir / "magg-demo"
    assert "| cells |" in done.stdout and "quicklook:" in done.stdout
    assert (demo / "quicklook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = sorted(demo.glob("granules/*.h5"))
    catalog = load_catalog(demo / "catalog.json")
    assert catalog.metadata["cycle"] == 22 and catalog.granule_count == len(paths)
    demo_sample = Sample(
        catalog=catalog,
        catalog_path=demo / "catalog.json",
        mirror=str(demo / "granules"),
        oracle=reference_statistics(paths),
    )
    assert_store_matches_oracle(str(demo / "atl06.zarr"), demo_sample)


def test_magg_run_fails_on_a_partial_cell_unless_told_to_accept_it(local_run, tmp_path, capsys):
    """One granule missing from the mirror: its cells are partial, never ok."""
    sample = local_run.sample
    mirror = tmp_path / "mirror"
    shutil.copytree(sample.catalog_path.parent / "granules", mirror)
    cells = {p: [g.name for g in sample.catalog.cells[p]] for p in sample.parents}
    lost = next(n for names in cells.values() if len(names) > 1 for n in names)
    (mirror / lost).unlink()
    touched = {p for p, names in cells.items() if lost in names}
    partial = {p for p in touched if len(cells[p]) > 1}
    run = ["run", "--catalog", str(sample.catalog_path), "--credentials", "none"]
    run += ["--granule-mirror", str(mirror), "--cells", *map(str, sorted(partial))]

    strict = main([*run, "--store", str(tmp_path / "strict.zarr")])
    strict_out = capsys.readouterr().out
    accepting = main([*run, "--store", str(tmp_path / "accepted.zarr"), "--accept-partial"])
    accepted_out = capsys.readouterr().out
    inspected = main(["inspect", str(tmp_path / "accepted.zarr")])
    inspect_out = capsys.readouterr().out

    assert (strict, accepting, inspected) == (1, 0, 0)
    assert f"(partial: {len(partial)})" in strict_out
    assert f"**{len(partial)} cells incomplete**" in strict_out
    assert f"**{len(partial)} partial cells accepted**" in accepted_out
    assert f"partial {len(partial)}" in inspect_out and lost in inspect_out
