"""Stores decode with the xdggs a reader has (0.6 or 0.7), old stores included; the
distribution's name, version and import names hold up beside a user's own files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import xdggs
import zarr

import magg
from magg_core.config import ConfigError, load_config
from magg_core.morton import parent_of, point_morton
from magg_core.store.arrays import (
    consolidate,
    create_template,
    open_store,
    upgrade_dggs_attributes,
    write_cell,
)
from tests.store.test_store import LATS, LONS, stats_for  # noqa: F401  (same sample cells)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# WGS84's defining parameters (NIMA TR8350.2, table 3.1).
WGS84 = {"name": "WGS84", "semimajor_axis": 6378137.0, "inverse_flattening": 298.257223563}


@pytest.fixture(scope="module")
def config():
    return load_config()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, config):
    """A store as magg writes it today: every level, two cells written, consolidated."""
    path = tmp_path_factory.mktemp("conventions") / "s.zarr"
    parents = np.unique(parent_of(point_morton(LATS, LONS, 12), 6))
    store = open_store(str(path))
    create_template(store, config, parents, {"catalog": {"cycle": 7, "short_name": "ATL06"}})
    for idx in (0, 3):
        write_cell(store, config, idx, stats_for(config, idx))
    consolidate(store)
    return path


@pytest.fixture(scope="module")
def xdggs_06(tmp_path_factory) -> Path:
    """xdggs 0.6.0 from the package index, alone in a directory for PYTHONPATH."""
    target = tmp_path_factory.mktemp("xdggs-0.6")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            "xdggs==0.6.0",
        ],
        check=True,
    )
    return target


DECODE_BOTH_WAYS = """
import json, sys
import xarray as xr, xdggs
ds = xr.open_zarr(sys.argv[1], group=sys.argv[2])
out = {"version": xdggs.__version__}
for way, decoded in (("decode", xdggs.decode(ds)), ("zarr", ds.dggs.decode(convention="zarr"))):
    info = decoded.dggs.grid_info
    e = info.ellipsoid
    if isinstance(e, str):
        params = [e, None, None]
    else:
        params = [e.name, e.semimajor_axis, e.inverse_flattening]
    out[way] = [info.level, info.indexing_scheme, *params]
print(json.dumps(out))
"""


def decode_in(path: Path, group: str, pythonpath: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-c", DECODE_BOTH_WAYS, str(path), group],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def expected(order: int) -> list:
    return [order, "nested", WGS84["name"], WGS84["semimajor_axis"], WGS84["inverse_flattening"]]


@pytest.mark.parametrize("order", [12, 6])
def test_fresh_store_decodes_with_installed_xdggs_both_ways(store_path, order):
    got = decode_in(store_path, str(order))
    assert got["version"] == xdggs.__version__
    assert got["decode"] == got["zarr"] == expected(order)


def test_fresh_store_decodes_with_xdggs_06_both_ways(store_path, xdggs_06):
    got = decode_in(store_path, "12", xdggs_06)
    assert got["version"] == "0.6.0"
    assert got["decode"] == got["zarr"] == expected(12)


def as_written_before_0_2(path: Path) -> None:
    """Rewrite a store's DGGS attributes as magg 0.1 wrote them (ellipsoid a bare name)."""
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    for _, group in root.groups():
        group.attrs["dggs"] = {**group.attrs["dggs"], "ellipsoid": "WGS84"}
        group["cell_ids"].attrs["ellipsoid"] = "WGS84"
    consolidate(open_store(str(path)))


def test_store_written_before_0_2_opens_and_upgrades(store_path, tmp_path, xdggs_06):
    old = tmp_path / "old.zarr"
    subprocess.run(["cp", "-r", str(store_path), str(old)], check=True)
    as_written_before_0_2(old)
    raw = xr.open_zarr(old, group="12")
    assert raw.attrs["dggs"]["ellipsoid"] == "WGS84"
    with pytest.raises(AttributeError):  # the xdggs 0.7 failure the issue reports
        raw.dggs.decode(convention="zarr")
    # 0.6 reads the old form as it always did (the name alone).
    assert decode_in(old, "12", xdggs_06)["decode"] == [12, "nested", "WGS84", None, None]

    # magg.open decodes it without touching it ...
    ds = magg.open(str(old), order=12)
    assert ds.dggs.grid_info.ellipsoid.semimajor_axis == WGS84["semimajor_axis"]
    assert zarr.open_group(str(old), mode="r")["12"].attrs["dggs"]["ellipsoid"] == "WGS84"
    # ... and `magg upgrade` rewrites the attributes (only them) for every reader.
    arrays_before = {p: p.read_bytes() for p in old.rglob("c/*")}
    done = subprocess.run([str(BIN / "magg"), "upgrade", str(old)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "groups 10, 11, 12, 6, 7, 8, 9" in done.stdout
    assert {p: p.read_bytes() for p in old.rglob("c/*")} == arrays_before
    assert decode_in(old, "12")["zarr"] == expected(12)
    assert upgrade_dggs_attributes(open_store(str(old))) == []  # idempotent


def test_magg_open_names_missing_order(store_path):
    ds = magg.open(str(store_path), order=9)
    assert ds.dggs.grid_info.level == 9
    with pytest.raises(ValueError, match=r"no group for order 13 \(orders present: 6, 7, 8"):
        magg.open(str(store_path), order=13)


@pytest.mark.parametrize("name", ["WGS 84", "wgs-84", "banana"])
def test_ellipsoid_is_validated_by_name(tmp_path, name):
    text = (ROOT / "magg_core/configs/atl06.yaml").read_text()
    assert "ellipsoid: WGS84" in text
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("ellipsoid: WGS84", f"ellipsoid: {name}"))
    with pytest.raises(ConfigError, match=rf"output\.ellipsoid.*unknown ellipsoid '{name}'"):
        load_config(str(path))


def test_other_named_ellipsoid_is_written_as_an_object(tmp_path):
    text = (ROOT / "magg_core/configs/atl06.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("ellipsoid: WGS84", "ellipsoid: GRS80"))
    params = load_config(str(path)).output.ellipsoid_parameters
    # GRS80 (Moritz 2000): a = 6378137 m, 1/f = 298.257222101 (to the printed digits).
    assert params["name"] == "GRS80" and params["semimajor_axis"] == 6378137.0
    assert params["inverse_flattening"] == pytest.approx(298.257222101, abs=1e-9)


def test_version_is_this_distributions():
    assert magg.DISTRIBUTION == "magg-icesat2"
    assert magg.__version__ == version("magg-icesat2")
    done = subprocess.run([str(BIN / "magg"), "--version"], capture_output=True, text=True)
    assert done.stdout.strip() == f"magg {version('magg-icesat2')} (magg-icesat2)"


SHADOWS = {
    "tasks.py": 'raise ImportError("a user\'s tasks.py was imported")\n',
    "flows.py": 'raise ImportError("a user\'s flows.py was imported")\n',
}


def test_user_tasks_and_flows_modules_do_not_shadow_magg(tmp_path):
    """A user's own tasks.py/flows.py in the working directory, and top-level
    ``tasks``/``flows`` packages on the path (what the unrelated distributions
    of those names install), are never what magg imports."""
    for name, text in SHADOWS.items():
        (tmp_path / name).write_text(text)
    site = tmp_path / "site"
    for name in ("tasks", "flows"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f'raise ImportError("distribution {name}")\n')
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import magg, magg.flows.process_cycle, magg.flows.cli, magg.tasks.cells;"
        "print(magg.flows.cli.__file__, magg.tasks.cells.__file__)"
    )
    for command in ([sys.executable, "-c", code], [str(BIN / "magg"), "--help"]):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert str(tmp_path) not in done.stdout
