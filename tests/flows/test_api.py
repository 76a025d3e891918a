"""The public Python API (``magg.run``, ``magg.open``), as README shows it, run as a user would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import magg
from magg_core.catalog.catalog import catalog_from_records, load_catalog
from magg_core.granules.sample import write_sample
from tests.oracle import reference_statistics

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_api_example() -> str:
    """README's Python block that uses ``magg`` (there is exactly one)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    using_magg = [b for b in blocks if b.startswith("import magg\n")]
    assert len(using_magg) == 1, "README should show one `import magg` example"
    return using_magg[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """What ``magg demo`` leaves before its run: ``magg-demo/granules`` and its catalog."""
    root = tmp_path_factory.mktemp("api")
    granules = write_sample(root / "magg-demo" / "granules", n_granules=3)
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    catalog.write(root / "magg-demo" / "catalog.json")
    return root


def test_readme_example_runs_as_a_script(demo_dir):
    """Saved as a file and run with no Prefect server configured: a temporary one serves it,
    and the local backend's worker processes (which import the script again) run the cells."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    script = demo_dir / "example.py"  # saved as a file, as a user runs it
    script.write_text(readme_api_example())
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=demo_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| wall time |" in done.stdout  # the summary's table
    assert "h_mean" in done.stdout and "cell_ids" in done.stdout  # the opened level

    opened = magg.open(str(demo_dir / "magg-demo" / "again.zarr"), order=12)
    assert opened.dggs.grid_info.level == 12
    expected = reference_statistics(sorted((demo_dir / "magg-demo" / "granules").glob("*.h5")))
    assert int(opened["count"].sum()) == sum(int(s["count"].sum()) for s in expected.values())
    raw = xr.open_zarr(demo_dir / "magg-demo" / "again.zarr", group="12")
    np.testing.assert_array_equal(opened["h_mean"].values, raw["h_mean"].values)


def test_run_returns_the_summary_when_cells_fail(demo_dir, prefect_server, tmp_path):
    """A lost granule makes its cells partial: ``magg.run`` returns the summary, naming them."""
    mirror = tmp_path / "granules"
    mirror.mkdir()
    granules = sorted((demo_dir / "magg-demo" / "granules").glob("*.h5"))
    for path in granules[1:]:
        shutil.copy(path, mirror / path.name)
    summary = magg.run(
        catalog=str(demo_dir / "magg-demo" / "catalog.json"),
        store=str(tmp_path / "s.zarr"),
        credentials="none",
        granule_mirror=str(mirror),
    )
    lost = granules[0].name
    catalog = load_catalog(demo_dir / "magg-demo" / "catalog.json")
    touched = {str(p) for p, urls in catalog.cells.items() if any(lost in str(u) for u in urls)}
    assert touched and set(summary["failed_cells"]) == touched, summary["markdown"]
    assert summary["status_counts"].get("partial", 0) + summary["status_counts"].get(
        "failed", 0
    ) == len(touched)
