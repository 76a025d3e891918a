"""The Retry button of the real Prefect UI re-runs only the cells whose granules were unreadable.

Everything is what an operator has: ``prefect server start`` (which serves
the UI), the work pools and ``prefect deploy --all`` from the repository's
``prefect.yaml``, a process worker, a ``process-cycle/local`` run over a
small sample in moto S3, and headless Chromium on the run's page. Some
granules are unreadable on the first run (see :data:`CELLS`, the one place
the faults are declared); the run ends Failed; the granules are repaired; a
person's clicks on Retry start the same flow run again; it completes, only
the broken cells ran again, and the store equals the independent oracle.

Screenshots of the run page and of its per-cell table, before and after the
retry, are written to ``$MAGG_TEST_ARTIFACTS`` (default: the test's tmp_path).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import load_config
from magg_core.granules.sample import SampleGranule, write_sample
from magg_core.store.arrays import open_store
from magg_core.store.records import read_records
from tests.browser import (
    click,
    headless_chromium,
    screenshot,
    visible,
    wait_for_text,
    wait_for_text_gone,
)
from tests.deploy_support import PrefectServer, prefect_cli, worker
from tests.flow_support import SAMPLE_CYCLE, Sample, assert_store_matches_oracle
from tests.oracle import reference_statistics

GRANULES_BUCKET, STORE_BUCKET = "magg-uiretry-granules", "magg-uiretry-output"
MIRROR = f"s3://{GRANULES_BUCKET}/ATL06"
STORE = f"s3://{STORE_BUCKET}/atl06/cycle{SAMPLE_CYCLE}.zarr"
RUN_TIMEOUT_S = 150


@dataclass(frozen=True)
class SampleCell:
    """One parent cell of the sample, and which of its granules are unreadable at first.

    Each cell is a small patch of track far from the others, so its granules
    cross this cell only and breaking one breaks no other cell.
    """

    label: str
    centre: tuple[float, float]
    granules: int
    missing: int = 0
    """Granules absent from the mirror until the repair uploads them."""
    truncated: int = 0
    """Granules cut to half their bytes until the repair rewrites them whole."""
    first_status: str = "ok"
    """The cell's record after the first run."""

    @property
    def broken(self) -> bool:
        return bool(self.missing or self.truncated)


CELLS = (
    SampleCell("healthy", centre=(-78.0, 40.0), granules=1),
    SampleCell(
        "every granule unreadable",
        centre=(-72.0, -70.0),
        granules=1,
        missing=1,
        first_status="failed",
    ),
    SampleCell(
        "1 of 2 granules unreadable",
        centre=(-75.0, 100.0),
        granules=2,
        truncated=1,
        first_status="partial",
    ),
)
"""The injected faults, all of them. A ``partial`` cell is one that read some of its
granules but not all: it must fail its task (and so the run), keep nothing stale,
and be re-run by Retry like a ``failed`` one."""


@dataclass(frozen=True)
class BrokenSample:
    """The sample in the mirror with its faults, and how to repair it."""

    sample: Sample
    cells: dict[int, SampleCell]
    """Parent morton word → the declared cell."""
    repairs: list[SampleGranule]
    """Granules to upload whole after the first run."""


@pytest.fixture
def artifacts_dir(tmp_path, request) -> Path:
    root = os.environ.get("MAGG_TEST_ARTIFACTS")
    return Path(root) / request.node.name if root else tmp_path / "screenshots"


def test_retry_clicked_in_the_ui_reruns_only_the_unreadable_cells(
    tmp_path, moto_server, s3_env, artifacts_dir, capsys
):
    server = PrefectServer(tmp_path, scheduler=False)
    try:
        with ThreadPoolExecutor(1) as background:
            starting = background.submit(server.start)  # its imports overlap the sample's writing
            broken = _broken_sample(tmp_path, moto_server)
            starting.result()
        rerun = {p for p, cell in broken.cells.items() if cell.broken}
        assert rerun and len(rerun) < len(broken.cells)

        setup = server.client_env(tmp_path / "setup-home")
        prefect_cli(["deployments/work-pools.sh"], {**setup, "MAGG_CELL_POOL_TYPE": "process"})
        worker_env = _worker_env(server, moto_server, tmp_path)
        with (
            worker("magg-process", worker_env, tmp_path / "worker.log"),
            headless_chromium() as browser,
        ):
            # The worker and the browser start while prefect.yaml's deployments register.
            prefect_cli(["prefect", "--no-prompt", "deploy", "--all"], setup)
            run_id = server.create_run(
                "process-cycle/local",
                {
                    "catalog": str(broken.sample.catalog_path),
                    "store": STORE,
                    "granule_mirror": MIRROR,
                    "credentials": "environment",
                },
            )["id"]
            first = server.wait_final(run_id, timeout_s=RUN_TIMEOUT_S)
            assert first["state"]["type"] == "FAILED", first["state"]

            # The records say what each cell saw; the run failed on exactly the broken cells.
            before = _records()
            assert {p: r.result.status for p, r in before.items()} == {
                p: cell.first_status for p, cell in broken.cells.items()
            }
            incomplete = f"{len(rerun)} of {len(broken.cells)} cells incomplete"
            assert incomplete in first["state"]["message"]
            assert _cell_states(server, run_id, attempt=1) == {
                p: "Failed" if p in rerun else "Completed" for p in broken.cells
            }

            for granule in broken.repairs:  # the mirror is repaired
                moto_server.client.upload_file(
                    str(granule.path), GRANULES_BUCKET, f"ATL06/{granule.name}"
                )
            shots = _retry_in_the_ui(browser, server, run_id, rerun, artifacts_dir)
            second = server.wait_final(run_id, timeout_s=RUN_TIMEOUT_S, after=1)
            shots += _show_completed_run(browser, server, run_id, artifacts_dir)

        with capsys.disabled():
            print("\nUI retry screenshots:\n" + "\n".join(f"  {p}" for p in shots))
        assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in shots)

        assert second["state"]["type"] == "COMPLETED", second["state"]
        assert second["run_count"] == 2
        # Only the broken cells ran again: the others came from the cache, and their
        # records are the first run's, untouched.
        assert _cell_states(server, run_id, attempt=2) == {
            p: "Completed" if p in rerun else "Cached" for p in broken.cells
        }
        after = _records()
        assert {p: r.result.status for p, r in after.items()} == dict.fromkeys(broken.cells, "ok")
        assert {p for p in broken.cells if after[p] != before[p]} == rerun
        assert_store_matches_oracle(STORE, broken.sample)
        # The per-cell table of each attempt, as the operator reads it.
        first_table, last_table = _cell_tables(server, run_id)
        assert {int(row["parent_morton"]) for row in first_table if row["status"] != "ok"} == rerun
        assert {row["status"] for row in last_table} == {"ok"}
    finally:
        server.stop()


# -- the sample and its faults ----------------------------------------------------------------


def _broken_sample(tmp_path: Path, moto_server) -> BrokenSample:
    """Write each declared cell's granules, upload them with the faults, run the oracle."""
    granules_by_cell = [
        write_sample(
            tmp_path / "granules" / f"cell-{i}",
            n_granules=cell.granules,
            extent_km=20,
            centre=cell.centre,
            seed=3,
        )
        for i, cell in enumerate(CELLS)
    ]
    everything = [g for granules in granules_by_cell for g in granules]
    catalog = catalog_from_records([g.umm for g in everything], cycle=SAMPLE_CYCLE)
    moto_server.create_bucket(GRANULES_BUCKET)
    moto_server.create_bucket(STORE_BUCKET)

    cells: dict[int, SampleCell] = {}
    repairs: list[SampleGranule] = []
    for cell, granules in zip(CELLS, granules_by_cell, strict=True):
        names = {g.name for g in granules}
        [parent] = [int(p) for p, gs in catalog.cells.items() if {g.name for g in gs} == names]
        cells[parent] = cell
        missing = granules[: cell.missing]
        truncated = granules[cell.missing : cell.missing + cell.truncated]
        repairs += missing + truncated
        for granule in granules[cell.missing :]:
            body = granule.path.read_bytes()
            if granule in truncated:
                body = body[: len(body) // 2]
            moto_server.client.put_object(
                Bucket=GRANULES_BUCKET, Key=f"ATL06/{granule.name}", Body=body
            )
    assert len(catalog.cells) == len(CELLS)  # each declared cell is one parent cell

    sample = Sample(
        catalog=catalog,
        catalog_path=catalog.write(tmp_path / "catalog.json"),
        mirror=MIRROR,
        oracle=reference_statistics([g.path for g in everything]),
    )
    return BrokenSample(sample=sample, cells=cells, repairs=repairs)


# -- Prefect: deployments and what the API says -----------------------------------------------


def _worker_env(server: PrefectServer, moto_server, tmp_path: Path) -> dict[str, str]:
    """A worker machine's environment: the Prefect API, and AWS settings that reach moto."""
    return server.client_env(
        tmp_path / "worker-home",
        AWS_ENDPOINT_URL_S3=moto_server.url,
        AWS_ACCESS_KEY_ID=moto_server.credentials.access_key_id,
        AWS_SECRET_ACCESS_KEY=moto_server.credentials.secret_access_key,
        AWS_REGION=moto_server.endpoint.region,
    )


def _cell_states(server: PrefectServer, run_id: str, *, attempt: int) -> dict[int, str]:
    """Parent → state name of its cell task in one attempt of the flow run."""
    runs = server.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
    cells = [
        r for r in runs if r["name"].startswith("cell-") and r["flow_run_run_count"] == attempt
    ]
    states = {int(r["name"].removeprefix("cell-")): r["state"]["name"] for r in cells}
    assert len(states) == len(cells), f"a cell ran twice in attempt {attempt}: {cells}"
    return states


def _cell_tables(server: PrefectServer, run_id: str) -> list[list[dict[str, Any]]]:
    """The run's per-cell tables (``magg-cells`` artifacts), oldest first."""
    return [json.loads(a["data"]) for a in _cell_table_artifacts(server, run_id)]


def _cell_table_artifacts(server: PrefectServer, run_id: str) -> list[dict[str, Any]]:
    return server.api(
        "POST",
        "/artifacts/filter",
        json={
            "artifacts": {"key": {"any_": ["magg-cells"]}, "flow_run_id": {"any_": [run_id]}},
            "sort": "CREATED_DESC",
        },
    )[::-1]


def _records() -> dict[int, Any]:
    return read_records(open_store(STORE, read_only=True), load_config())


# -- the UI -----------------------------------------------------------------------------------


def _ui_base(server: PrefectServer) -> str:
    """Where the server's default UI lives (``/v2`` in prefect 3.9, the classic UI at ``/``)."""
    root = server.api_url.removesuffix("/api")
    settings = httpx.get(f"{root}/ui-settings", timeout=10).raise_for_status().json()
    assert settings["api_url"] == server.api_url, "the UI would talk to another server"
    assert settings["default_ui"] == "v2", "the clicks below are the v2 UI's"
    return root + settings["v2_base_url"].rstrip("/")


def _retry_in_the_ui(
    browser: WebDriver, server: PrefectServer, run_id: str, rerun: set[int], directory: Path
) -> list[Path]:
    """Look at the failed run and its cell table, then retry it with the UI's own controls.

    In the v2 UI, Retry is an item of the run page's actions menu (the
    "Open menu" button); it opens a confirmation dialog whose Retry button
    sets the run ``AwaitingRetry``. Returns the screenshots taken.
    """
    ui = _ui_base(server)
    first_table = _cell_table_artifacts(server, run_id)[0]
    browser.get(f"{ui}/artifacts/artifact/{first_table['id']}")
    for parent in rerun:
        wait_for_text(browser, str(parent))
    table = screenshot(browser, directory / "2-cell-table-failed.png")

    browser.get(f"{ui}/runs/flow-run/{run_id}")
    wait_for_text(browser, server.flow_run(run_id)["name"])
    wait_for_text(browser, "Failed")
    _show_cell_task_runs(browser, [str(p) for p in rerun])
    run_page = screenshot(browser, directory / "1-run-failed.png")

    click(browser, "//button[.//*[normalize-space()='Open menu']]")
    click(browser, "//*[@role='menuitem'][normalize-space()='Retry']")
    dialog = visible(browser, "//*[@role='alertdialog']")
    assert "AwaitingRetry" in dialog.text, dialog.text
    confirmation = screenshot(browser, directory / "3-retry-dialog.png")
    click(browser, "//*[@role='alertdialog']//button[normalize-space()='Retry']")
    wait_for_text(browser, "Flow run scheduled for retry")
    return [run_page, table, confirmation]


def _show_completed_run(
    browser: WebDriver, server: PrefectServer, run_id: str, directory: Path
) -> list[Path]:
    """The retried run's task runs (cached and re-run cells) and its new cell table."""
    ui = _ui_base(server)
    last_table = _cell_table_artifacts(server, run_id)[-1]
    parents = [row["parent_morton"] for row in json.loads(last_table["data"])]
    browser.get(f"{ui}/runs/flow-run/{run_id}")
    wait_for_text(browser, "Completed")
    _show_cell_task_runs(browser, parents)
    run_page = screenshot(browser, directory / "4-run-completed.png")

    browser.get(f"{ui}/artifacts/artifact/{last_table['id']}")
    for parent in parents:
        wait_for_text(browser, parent)
    table = screenshot(browser, directory / "5-cell-table-completed.png")
    return [run_page, table]


def _show_cell_task_runs(browser: WebDriver, parents: list[str]) -> None:
    """Open the run page's Task Runs tab, narrowed to the cell tasks by its search box.

    It shows, attempt by attempt, which cell ran, failed or came from the cache.
    """
    click(browser, "//*[@role='tab'][normalize-space()='Task Runs']")
    visible(browser, "//input[@placeholder='Search by run name']").send_keys("cell-")
    wait_for_text_gone(browser, "read_catalog")  # a task of every run, but not a cell's
    for parent in parents:
        wait_for_text(browser, f"cell-{parent}")
