"""The ``magg`` command line against the fake CMR and a real Prefect server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml

from magg.flows.cli import main
from magg_core.catalog.catalog import Catalog, CatalogGranule, catalog_from_records, load_catalog
from magg_core.granules.sample import write_sample
from tests import oracle
from tests.deploy_support import BIN, clean_environment
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
    capsys.readouterr()
    assert main(["plot", str(store), "--variable", "dhdt", "--output", str(png)]) == 1
    assert "no variable 'dhdt' here; this store has count, h_max" in capsys.readouterr().err


def test_a_run_counts_the_points_each_filter_dropped_in_its_summary_records_and_inspect(
    catalog_file, granules, prefect_server, tmp_path, capsys
):
    store = tmp_path / "out.zarr"
    catalog = load_catalog(catalog_file)
    paths = [g.path for g in granules]
    run = ["run", "--catalog", str(catalog_file), "--store", str(store)]
    run += ["--credentials", "none", "--granule-mirror", str(granules[0].path.parent)]
    assert main(run) == 0
    out = capsys.readouterr().out

    expected = dict.fromkeys(oracle.FILTERS, 0)
    for parent in catalog.parents:
        for name, n in oracle.filter_counts(paths, int(parent)).items():
            expected[name] += n
    total = sum(expected.values())
    assert expected["quality"] and expected["fill"]
    line = ", ".join(f"{name} {n:,}" for name, n in expected.items())
    assert f"| points left out | {total:,} dropped: {line} |" in out
    assert main(["inspect", str(store)]) == 0
    kept = sum(
        len(oracle.points_in_parent(oracle.good_points(paths), int(p))) for p in catalog.parents
    )
    assert (
        f"points: {kept:,} in the statistics, {total:,} dropped: {line}" in capsys.readouterr().out
    )


@pytest.mark.parametrize("change", ["spelling", "release"])
def test_a_catalog_file_naming_one_acquisition_twice_is_refused_before_any_work(
    change, catalog_file, granules, prefect_server, tmp_path, capsys
):
    catalog = load_catalog(catalog_file)
    cell = max(catalog.cells, key=lambda c: len(catalog.cells[c]))
    first = catalog.cells[cell][0]
    if change == "spelling":  # the same object: s3://bucket//key
        bucket, _, key = first.s3.removeprefix("s3://").partition("/")
        again = CatalogGranule(name="ATL06_alias.h5", s3=f"s3://{bucket}//{key}/.", https=None)
    else:  # the same acquisition in another release, in another cell
        name = first.name.replace("_007_", "_006_")
        again = CatalogGranule(name=name, s3=first.s3.replace(first.name, name), https=None)
        cell = next(c for c in catalog.cells if c != cell)
    cells = {**catalog.cells, cell: (*catalog.cells[cell], again)}
    edited = Catalog(metadata=catalog.metadata, cells=cells).write(tmp_path / "edited.json")
    store = tmp_path / "out.zarr"
    run = ["run", "--catalog", str(edited), "--store", str(store), "--credentials", "none"]

    assert main([*run, "--granule-mirror", str(granules[0].path.parent)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("magg ") and f"cells[{cell}]" in err[-1]
    assert ("twice" if change == "spelling" else "two revisions or releases") in err[-1]
    assert not store.exists()


@pytest.mark.parametrize("weight", ["0", "10**400"])
def test_a_weight_invalid_for_every_point_fails_the_run_naming_the_expression(
    weight, catalog_file, granules, prefect_server, tmp_path, capsys
):
    """Such a config dropped every point and ended Completed, exit 0, every cell empty."""
    config = yaml.safe_load(Path(resources.files("magg_core.configs") / "atl06.yaml").read_text())
    config["aggregation"]["columns"]["weight"] = weight
    config_file = tmp_path / "weights.yaml"
    config_file.write_text(yaml.safe_dump(config))
    store = tmp_path / "out.zarr"
    run = ["run", "--catalog", str(catalog_file), "--store", str(store), "--max-cells", "2"]
    run += ["--credentials", "none", "--granule-mirror", str(granules[0].path.parent)]

    assert main([*run, "--config", str(config_file)]) == 1
    assert "| cells | 2 (failed: 2) |" in capsys.readouterr().out
    assert main(["inspect", str(store), "--config", str(config_file)]) == 0
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(failed) == 2
    assert all(f"aggregation.columns.weight = '{weight}'" in line for line in failed)


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
        (["run", "--cycle", "22", "--store", "x.zarr"], "EARTHDATA_TOKEN"),
        (["inspect", "/nonexistent/store.zarr"], "store.zarr"),
        (["inspect", "/nonexistent/store.zarr"], "(no such directory)"),
        (["inspect", "{tmp}"], "has no magg template for config 'atl06'"),
        (["plot", "/nonexistent/store.zarr"], "/nonexistent/store.zarr holds no magg store"),
        (["plot", "/nonexistent/store.zarr"], "(no such directory)"),
        (
            ["height-change", "--cycles", "20", "21", "22", "--output", "dhdt.zarr"]
            + ["--store", "/nonexistent/c{cycle}.zarr"],
            "store /nonexistent/c20.zarr (cycle 20) has no finished magg template",
        ),
        (
            ["height-change", "--cycles", "22", "--store", "c{cycle}.zarr", "-o", "d.zarr"],
            "at least two distinct",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, message, prefect_server, capsys, tmp_path):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("magg ") and message in err[-1]
    if args[0] in ("inspect", "plot") and "{tmp}" in args:  # there, but not a store
        assert "no such directory" not in err[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--catalog", "{tmp}/none.json"], "cannot read catalog '{tmp}/none.json'"),
        (["--catalog", "{tmp}/bad.json"], "catalog '{tmp}/bad.json' is not JSON"),
        ([], "give a cycle, or both a start and an end date, or a --catalog file"),
        (["--start-date", "2024-01-01"], "or a --catalog file"),
        (["--cycle", "22", "--start-date", "2024-01-01"], "not both"),
    ],
)
def test_run_refuses_what_it_can_tell_before_any_flow_run(
    args, message, prefect_server, capsys, tmp_path
):
    """A catalog that does not load, or nothing to query CMR for: one line, and no flow run
    is ever created (the check comes before Prefect is started or asked)."""
    from prefect.client.orchestration import get_client

    (tmp_path / "bad.json").write_text('{"format": 1, "cells"')
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs(limit=200))
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["run", *args, "--store", str(tmp_path / "x.zarr"), "--credentials", "none"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("magg run: error: ") and message.format(tmp=tmp_path) in line
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs(limit=200)) == before
    assert not (tmp_path / "x.zarr").exists()


def test_demo_runs_the_main_job_on_the_sample(prefect_server, tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--granules", "3"]) == 0
    out = capsys.readouterr().out
    assert "quicklook:" in out and "failed" not in out.split("| cells |")[1].splitlines()[0]
    assert (tmp_path / "demo" / "quicklook.png").stat().st_size > 10_000
    catalog = json.loads((tmp_path / "demo" / "catalog.json").read_text())
    assert catalog["metadata"]["cycle"] == CYCLE


# -- user errors through the real ``magg`` script: what a user sees on the terminal ----


@pytest.fixture(scope="module")
def bad_inputs(granules, tmp_path_factory) -> dict[str, Path]:
    """Files a user might pass by mistake, each broken in one way."""
    root = tmp_path_factory.mktemp("bad-inputs")
    good = catalog_from_records([g.umm for g in granules], cycle=CYCLE)
    files = {"catalog": good.write(root / "catalog.json")}
    files["syntax.yaml"] = root / "syntax.yaml"
    files["syntax.yaml"].write_text("name: x\ndata_source: [1, 2\n")
    files["unknown-key.yaml"] = root / "unknown-key.yaml"
    files["unknown-key.yaml"].write_text("name: x\ncolour: blue\n")
    files["deep.yaml"] = root / "deep.yaml"
    files["deep.yaml"].write_text("a: " + "[" * 20_000 + "]" * 20_000 + "\n")
    files["not-json.json"] = root / "not-json.json"
    files["not-json.json"].write_text('{"metadata": {"cycle": 22}, "cells": {')
    bad_field = json.loads(files["catalog"].read_text())
    bad_field["cells"]["not-a-cell"] = []
    files["bad-field.json"] = root / "bad-field.json"
    files["bad-field.json"].write_text(json.dumps(bad_field))
    parent, granules_of_parent = next(iter(good.cells.items()))
    local = CatalogGranule(name=granules_of_parent[0].name, s3="/etc/passwd", https=None)
    files["local-granule.json"] = Catalog(
        metadata=good.metadata, cells={**good.cells, parent: (local,)}
    ).write(root / "local-granule.json")
    return files


SEPARATOR = "=== magg case ==="
MANY_RUNS = f"""
import json, sys
from magg.flows.cli import main
for args in json.loads(sys.argv[1]):
    print({SEPARATOR!r}, file=sys.stderr, flush=True)
    try:
        code = main(args)
    except SystemExit as exited:  # argparse's usage errors
        code = exited.code
    print(f"{SEPARATOR} exit {{code}}", file=sys.stderr, flush=True)
"""
"""``main`` for each argument list in turn, as the ``magg`` script calls it: one
Prefect import for many cases instead of one per case."""


def _start(command: list[str], api_url: str, home: Path) -> subprocess.Popen:
    env = clean_environment(PREFECT_API_URL=api_url, PREFECT_HOME=str(home))
    return subprocess.Popen(
        command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _assert_one_clear_line(name: str, err: str, code: int, named: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"{name}: exit {code}"
    assert 1 <= len(lines) <= 2, f"{name}:\n{err}"
    assert "Traceback" not in err and named in err, f"{name}:\n{err}"
    assert lines[0].startswith("magg "), f"{name}:\n{err}"


def _run_logs(**parameters: str) -> str:
    """Everything the API holds of the one ``process-cycle`` run given these parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        recent = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)
        (run,) = [r for r in recent if parameters.items() <= r.parameters.items()]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return "\n".join(log.message for log in logs)


def test_user_errors_are_one_or_two_lines_without_a_traceback(bad_inputs, prefect_server, tmp_path):
    """Each mistake as a user sees it: stderr of a fresh process, Prefect logging at INFO.

    The first through the ``magg`` script itself, the rest through ``main`` in
    one more process; flow errors come from a real run on the test server.
    """
    from prefect.settings import PREFECT_API_URL

    files = {name: str(path) for name, path in bad_inputs.items()}
    run = ["run", "--credentials", "none", "--store", str(tmp_path / "out.zarr")]
    with_catalog = [*run, "--catalog", files["catalog"]]
    first = ([*with_catalog, "--config", files["syntax.yaml"]], files["syntax.yaml"])
    cases = {
        "unknown key": ([*with_catalog, "--config", files["unknown-key.yaml"]], "colour"),
        "nested 20,000 deep": ([*with_catalog, "--config", files["deep.yaml"]], "deep.yaml"),
        "missing config": ([*with_catalog, "--config", "/no/such/config.yaml"], "config.yaml"),
        "catalog not json": ([*run, "--catalog", files["not-json.json"]], "not-json.json"),
        "catalog bad field": ([*run, "--catalog", files["bad-field.json"]], "'not-a-cell'"),
        "catalog names a local file": (
            [*run, "--catalog", files["local-granule.json"]],
            "s3 URL '/etc/passwd' is not s3://bucket/key",
        ),
        "unknown cell": ([*with_catalog, "--cells", "12345"], "12345"),
        "bad store": (["run", "--catalog", files["catalog"], "--store", "ftp://b/x.zarr"], "ftp:"),
        "store is a file": (
            ["run", "--catalog", files["catalog"], "--store", files["catalog"]],
            f"argument --store: '{files['catalog']}': is an existing file",
        ),
        "mirror not there": (
            [*with_catalog, "--granule-mirror", "/no/such/mirror"],
            "argument --granule-mirror: '/no/such/mirror': no such directory",
        ),
        "catalog bad region": (
            ["catalog", "--cycle", "22", "--region", "/no/r.geojson"],
            "r.geojson",
        ),
        "catalog bad date": (
            ["catalog", "--start-date", "22/01/2024", "--end-date", "2024-02-01"],
            "22/01/2024",
        ),
    }
    api = PREFECT_API_URL.value()
    script = _start([str(BIN / "magg"), *first[0]], api, tmp_path / "home-script")
    arguments = json.dumps([args for args, _ in cases.values()])
    many = _start([str(BIN / "python"), "-c", MANY_RUNS, arguments], api, tmp_path / "home")

    _, err = script.communicate(timeout=300)
    _assert_one_clear_line("yaml syntax", err, script.returncode, first[1])
    assert "Traceback" in _run_logs(config=files["syntax.yaml"])  # kept where the UI shows it
    _, err = many.communicate(timeout=300)
    assert many.returncode == 0, err
    outputs = err.split(SEPARATOR)[1:]
    assert len(outputs) == 2 * len(cases), err
    endings = [(outputs[i], outputs[i + 1]) for i in range(0, len(outputs), 2)]
    for name, (output, ending) in zip(cases, endings, strict=True):
        code = int(ending.split("exit")[1])
        _assert_one_clear_line(name, output, code, cases[name][1])


@pytest.mark.parametrize(
    ("file", "text"),
    [
        (
            "home/profiles.toml",
            'active = "lasting"\n\n[profiles.lasting]\nPREFECT_API_URL = "{url}"\n',
        ),
        ("work/prefect.toml", '[api]\nurl = "{url}"\n'),
    ],
    ids=["profile", "prefect.toml"],
)
def test_a_server_named_in_prefects_settings_runs_the_flow(
    file, text, catalog_file, granules, prefect_server, tmp_path
):
    """No ``PREFECT_API_URL`` in the environment, but Prefect's settings name a server:
    the active profile, or ``prefect.toml`` in the working directory.

    The ``magg`` script launches a temporary server before Prefect can read
    them; the named server must still be the one the flow runs on.
    """
    from prefect.settings import PREFECT_API_URL

    for folder in ("home", "work"):
        (tmp_path / folder).mkdir()
    (tmp_path / file).write_text(text.format(url=PREFECT_API_URL.value()))
    store = str(tmp_path / "out.zarr")
    command = [str(BIN / "magg"), "run", "--catalog", str(catalog_file), "--store", store]
    command += ["--credentials", "none", "--granule-mirror", str(granules[0].path.parent)]

    done = subprocess.run(
        [*command, "--dry-run"],
        env=clean_environment(PREFECT_HOME=str(tmp_path / "home")),
        cwd=tmp_path / "work",
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    assert "cells would be processed" in done.stdout
    assert "cells to process into" in _run_logs(store=store)  # the run is on that server


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("--store", "{file}", "'{file}': is an existing file, not a store directory"),
        ("--store", "file://{file}", "is an existing file, not a store directory"),
        ("--store", "{file}/x.zarr", "lies under '{file}', which is an existing file"),
        ("--granule-mirror", "{missing}", "'{missing}': no such directory"),
        ("--granule-mirror", "{file}", "'{file}': is not a directory"),
    ],
)
def test_a_path_argument_of_the_wrong_kind_is_refused_before_any_work(
    argument, value, message, tmp_path, capsys
):
    """Named in one line by argparse, before the catalog is read or anything written."""
    file = tmp_path / "notes.txt"
    file.write_text("a user's file\n")
    places = {"file": str(file), "missing": str(tmp_path / "mirror")}
    args = ["run", "--catalog", str(tmp_path / "no-catalog.json"), "--credentials", "none"]
    args += ["--store", str(tmp_path / "out.zarr"), argument, value.format(**places)]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"magg run: error: argument {argument}: ")
    assert message.format(**places) in line
    assert file.read_text() == "a user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_run_help_says_what_keep_fragments_adds_per_point(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep-fragments" in text
    assert "latitude, longitude and time: 34 instead of 10 bytes a point" in text


# -- live progress: on a terminal only ------------------------------------------------------


@pytest.fixture(scope="module")
def mirror_missing_one(granules, tmp_path_factory) -> Path:
    """The sample's granules but one: that granule's extract fails, its cells are partial."""
    mirror = tmp_path_factory.mktemp("mirror")
    for granule in granules[1:]:
        shutil.copy(granule.path, mirror / granule.name)
    return mirror


def _run_command(catalog_file: Path, mirror: Path, store: Path) -> list[str]:
    return [str(BIN / "magg"), "run", "--catalog", str(catalog_file), "--store", str(store)] + [
        "--credentials",
        "none",
        "--granule-mirror",
        str(mirror),
    ]


def test_a_terminal_shows_live_progress_with_failures_then_the_summary(
    catalog_file, granules, mirror_missing_one, prefect_server, tmp_path
):
    """``magg run`` with its standard output on a pseudo-terminal, as in a shell."""
    import pty

    from prefect.settings import PREFECT_API_URL

    n_cells = len(load_catalog(catalog_file).cells)
    env = clean_environment(
        PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "home")
    )
    leader, follower = pty.openpty()
    command = _run_command(catalog_file, mirror_missing_one, tmp_path / "out.zarr")
    process = subprocess.Popen(command, env=env, stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    screen = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer has gone
            break
        if not data:
            break
        screen += data
    os.close(leader)
    assert process.wait(timeout=60) == 1  # partial cells: the run is incomplete
    text = screen.decode(errors="replace")

    assert re.search(rf"extracts\s.*{len(granules)}/{len(granules)}\s+1 failed", text), text
    assert re.search(rf"cells\s.*{n_cells}/{n_cells}\s+\d+ failed", text), text
    assert "elapsed" in text and "ETA" in text
    assert "| cells |" in text and "cells incomplete" in text  # the summary, as before


def test_without_a_terminal_the_output_is_the_summary_alone(
    catalog_file, granules, mirror_missing_one, prefect_server, tmp_path
):
    """Piped or redirected (a log file, CI), ``magg run`` prints no progress."""
    from prefect.settings import PREFECT_API_URL

    command = _run_command(catalog_file, mirror_missing_one, tmp_path / "out.zarr")
    done = subprocess.run(
        command,
        env=clean_environment(
            PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "home")
        ),
        capture_output=True,
        timeout=300,
    )

    assert done.returncode == 1
    out = done.stdout.decode()
    assert out.startswith("# magg run into") and "| cells |" in out
    assert "ETA" not in out and "elapsed" not in out and "\x1b" not in out
