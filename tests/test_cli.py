"""The ``magg`` command line against the fake CMR and a real Prefect server."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from magg_core.catalog import load_catalog
from magg_core.sample import write_sample
from tests.fakes.cmr import FakeCmr

CYCLE = 22


@pytest.fixture(scope="module")
def granules(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("granules"), n_granules=4)


@pytest.fixture(scope="module")
def cmr(granules):
    fake = FakeCmr().start()
    fake.items = [g.umm for g in granules]
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def catalog_file(cmr, tmp_path_factory):
    path = tmp_path_factory.mktemp("catalog") / "catalog.json"
    code = main(
        ["catalog", "--cycle", str(CYCLE), "--region", "antarctica"]
        + ["--cmr-url", cmr.url, "--output", str(path)]
    )
    assert code == 0
    return path


def test_catalog_writes_a_catalog_of_the_cycles_granules(catalog_file, granules, capsys):
    catalog = load_catalog(catalog_file)
    names = {g.name for cell in catalog.cells.values() for g in cell}
    assert names == {g.name for g in granules}
    assert catalog.metadata["cycle"] == CYCLE
    assert [int(p) for p in catalog.parents] == sorted(int(p) for p in catalog.parents)


def test_run_inspect_and_plot_consume_the_catalog(
    catalog_file, granules, prefect_server, tmp_path, capsys
):
    store = tmp_path / "out.zarr"
    mirror = str(granules[0].path.parent)
    common = ["run", "--catalog", str(catalog_file), "--store", str(store)]
    common += ["--credentials", "none", "--granule-mirror", mirror]

    assert main([*common, "--dry-run"]) == 0
    n_cells = len(load_catalog(catalog_file).cells)
    assert f"{n_cells} cells would be processed" in capsys.readouterr().out

    assert main([*common, "--max-cells", "2"]) == 0
    assert "| cells | 2 (ok: 2) |" in capsys.readouterr().out

    assert main(["inspect", str(store)]) == 0
    report = capsys.readouterr().out
    assert f"{n_cells} parent cells" in report
    assert "ok 2" in report and f"not yet run {n_cells - 2}" in report

    png = tmp_path / "h_mean.png"
    assert main(["plot", str(store), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["catalog", "--cycle", "0"], "cycle"),
        (["catalog", "--cycle", "22", "--region", "atlantis"], "atlantis"),
        (
            ["run", "--catalog", "/nonexistent/catalog.json", "--store", "x.zarr"]
            + ["--credentials", "none"],
            "catalog.json",
        ),
        (["run", "--catalog", "c.json", "--store", "x.zarr"], "EARTHDATA_TOKEN"),
        (["inspect", "/nonexistent/store.zarr"], "store.zarr"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, prefect_server, capsys, tmp_path):
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("magg ") and message in err[-1]


def test_demo_runs_the_main_job_on_the_sample(prefect_server, tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--granules", "3"]) == 0
    out = capsys.readouterr().out
    assert "quicklook:" in out and "failed" not in out.split("| cells |")[1].splitlines()[0]
    assert (tmp_path / "demo" / "quicklook.png").stat().st_size > 10_000
    catalog = json.loads((tmp_path / "demo" / "catalog.json").read_text())
    assert catalog["metadata"]["cycle"] == CYCLE
