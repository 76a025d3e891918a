"""Tasks that finish a run: pyramid levels, consolidated metadata and what the run reports."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.logging import get_logger

from magg_core.config import PipelineConfig
from magg_core.grid.assembly import assemble_levels
from magg_core.grid.cell import record_failure
from magg_core.report.progress import Progress, RunProgress
from magg_core.report.summary import cell_table, incomplete_cells, summarize, to_markdown
from magg_core.schema import CellRequest, CellResult, ExtractResult
from magg_core.store.arrays import consolidate, open_store
from magg_core.store.fragments import delete_fragments


class ProgressArtifact:
    """The run's progress artifact (0–100 % of work items finished), a progress watcher.

    Updated only when the whole percentage changes, so a 2,000-cell run sends
    at most ~100 updates instead of one per cell; and sent from a thread of
    its own, because each update is a request to the Prefect API, which a busy
    server answered in ~0.1–0.8 s here: sent from the dispatch loop, the
    updates held back the next task while workers sat idle. Only the latest
    percentage is sent; :meth:`close` sends the last one before returning.
    """

    def __init__(self) -> None:
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="magg-cells-progress", description="work items finished"
        )
        self.shown = 0
        self._wanted = 0
        self._closed = False
        self._changed = threading.Condition()
        context = contextvars.copy_context()  # the flow run's API client and settings
        self._sender = threading.Thread(
            target=context.run, args=(self._send,), name="magg-progress", daemon=True
        )
        self._sender.start()

    def __call__(self, progress: Progress) -> None:
        percent = int(100 * progress.fraction)
        with self._changed:
            if percent != self._wanted:
                self._wanted = percent
                self._changed.notify()

    def close(self) -> None:
        """Send the latest percentage, then stop the sender."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._sender.join()

    def _send(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._wanted != self.shown or self._closed)
                wanted, closed = self._wanted, self._closed
            if wanted != self.shown:
                try:
                    update_progress_artifact(self.artifact_id, progress=float(wanted))
                    self.shown = wanted
                except Exception:  # the artifact is a view; the run goes on without it
                    get_logger("magg").warning("progress artifact not updated", exc_info=True)
                    return
            elif closed:
                return


@contextmanager
def run_progress(extracts: int, cells: int) -> Iterator[RunProgress]:
    """A run's progress counter, watched by its Prefect artifact and by in-process watchers
    (:func:`magg_core.report.progress.watching`: the CLI's live display)."""
    artifact = ProgressArtifact()
    try:
        yield RunProgress(extracts, cells, watchers=(artifact,))
    finally:
        artifact.close()


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def assemble_store_levels(store_path: str, config: PipelineConfig) -> int:
    """Build the coarse pyramid levels from the cells' staging objects (every run, idempotent).

    Never cached: cells of this run may have replaced their staging objects.
    Returns how many parents have data.
    """
    found = assemble_levels(open_store(store_path), config)
    get_run_logger().info(
        "levels %s assembled from %d parents with data",
        ", ".join(map(str, config.output.orders[:-1])),
        found,
    )
    return found


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def consolidate_store(store_path: str) -> None:
    """Consolidate the store's metadata so readers open it with one request."""
    consolidate(open_store(store_path))


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def remove_fragments(store_path: str, config: PipelineConfig) -> None:
    """Delete the run's fragments once every cell is complete (unless the run keeps them)."""
    delete_fragments(open_store(store_path), config)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record_failed_cells(requests: Sequence[CellRequest], failures: Mapping[int, str]) -> None:
    """Leave a ``failed`` record for each cell whose task ended without a result.

    A cell that raised (write refused, retries exhausted, deadline, a Lambda
    that crashed) wrote no record of its own; without one ``magg inspect``
    would call it "not yet run". Written after its last attempt, so no attempt
    of this run can overwrite it.
    """
    for request in requests:
        record_failure(request, failures[request.parent_morton])


@task(cache_policy=NONE)
def report_run(
    results: Sequence[CellResult],
    failures: Mapping[int, str],
    extracts: Sequence[ExtractResult],
    *,
    wall_s: float,
    lambda_memory_mb: int,
    lambda_architecture: str,
    store_path: str,
    accept_partial: bool = False,
) -> dict[str, Any]:
    """Publish the per-cell table and the summary; return the summary as a dict.

    ``failures`` maps each cell whose task failed without a result to a
    one-line reason. The returned ``failed_cells`` are the cells that make the
    run incomplete (failed, and partial unless ``accept_partial``); its
    ``markdown`` is the summary artifact's text, for the CLI to print.
    """
    summary = summarize(
        results,
        failed=len(failures),
        wall_s=wall_s,
        lambda_memory_mb=lambda_memory_mb,
        lambda_architecture=lambda_architecture,
    )
    rows = cell_table(results, failures)
    create_table_artifact(rows, key="magg-cells", description=f"one row per cell of {store_path}")
    markdown = to_markdown(summary, title=f"magg run into {store_path}")
    fetched = sum(e.bytes_fetched for e in extracts)
    written = sum(e.bytes_written for e in extracts)
    reused = sum(e.reused for e in extracts)
    markdown += (
        f"\n| extract | {len(extracts):,} granules ({reused:,} already in the store): "
        f"{fetched / 1e6:,.1f} MB fetched, {written / 1e6:,.1f} MB of fragments |"
    )
    incomplete = incomplete_cells(results, failures, accept_partial=accept_partial)
    if incomplete:
        markdown += (
            f"\n\n**{len(incomplete)} cells incomplete** (failed or partial): "
            "retry the flow run to re-run only them."
        )
    elif summary.status_counts.get("partial"):
        markdown += (
            f"\n\n**{summary.status_counts['partial']} partial cells accepted**: "
            "their statistics miss the granules listed in the table."
        )
    create_markdown_artifact(markdown, key="magg-summary", description="run summary")
    get_run_logger().info("%s", summary.one_line())
    return {
        **asdict(summary),
        "failed_cells": [str(p) for p in incomplete],
        "granules_extracted": len(extracts),
        "extract_bytes_fetched": fetched,
        "fragment_bytes_written": written,
        "store": store_path,
        "markdown": markdown,
    }
