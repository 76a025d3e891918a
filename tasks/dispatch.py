"""Dispatch: keep a window of task runs in flight and collect what each left.

Both gridding flows (``process-cycle``'s extracts and cells, ``height-change``'s
fits) submit their per-item tasks through :func:`run_windowed`, so a flow never
imports another flow for it.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prefect.futures import PrefectFuture

from magg_core.errors import CellFailedError, GroupFailedError, GroupInterruptedError, is_transient

GROUP_TASK_RUNS = 32
"""The task runs the local and dask backends do a run's extracts in, and its cells,
at most (:func:`in_groups`). Each task run costs the flow and the API ~35–50 ms of
CPU (creating it, its cache look-up, states, events, its persisted result), as much
as gridding a cell of real density; a run of 232 cells spent ~10 s of a 25 s run
on 256 task runs (docs/performance.md §12), and a cycle has thousands of granules."""


def run_windowed[T, K](
    submit: Callable[[T], PrefectFuture],
    items: Iterable[T],
    window: int,
    on_done: Callable[[bool], None],
    keys: Callable[[T], Sequence[K]],
) -> tuple[list[Any], dict[K, str]]:
    """Keep at most ``window`` tasks in flight; collect each item's results and failures.

    An item is the work of one task run: one granule or cell, or a group of
    cells (``keys(item)``: its members' keys, one for a single item), whose
    task returns a list of results. Results include the failed and partial
    cells whose task raised with their result (one cell's
    :class:`CellFailedError`, a group's :class:`GroupFailedError` or
    :class:`GroupInterruptedError`); ``failures`` are the members that
    ended without one (key → one-line reason). ``on_done(ok)`` is called once
    per member as its task ends: ``ok`` when it has a result that is not
    ``failed`` (an unreadable granule's extract) nor incomplete.

    Submitting everything at once would start one thread per task; a window
    bounds threads and memory while keeping the backend saturated.
    """
    pending = iter(items)
    done: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    in_flight: dict[PrefectFuture, Sequence[K]] = {}
    results: list[Any] = []
    failures: dict[K, str] = {}

    def fill() -> None:
        while len(in_flight) < window:
            item = next(pending, None)
            if item is None:
                return
            future = submit(item)
            in_flight[future] = keys(item)
            future.add_done_callback(done.put)

    def report(outcomes: Sequence[Any], failed: dict[K, str]) -> None:
        results.extend(outcomes)
        for outcome in outcomes:
            complete = getattr(outcome, "is_complete", None)
            on_done(getattr(outcome, "status", None) != "failed" and complete is not False)
        for name, reason in failed.items():
            failures[name] = _first_line(reason)
            on_done(False)

    fill()
    while in_flight:
        future = done.get()
        names = in_flight.pop(future)
        future.wait()  # sets the final state locally; the API may not have it yet
        state = future.state
        if state.is_completed():
            value = future.result()
            report(value if isinstance(value, list) else [value], {})
            fill()
            continue
        error = future.result(raise_on_failure=False)
        if isinstance(error, GroupFailedError | GroupInterruptedError):
            report(error.results, error.failures)
        elif isinstance(error, CellFailedError) and error.result is not None:
            report([error.result], {})  # a failed or partial cell, with its granules' reasons
        else:
            report([], dict.fromkeys(names, state.message or state.name))
        fill()
    return results, failures


def in_groups[T](items: Sequence[T], task_runs: int | None = None) -> list[list[T]]:
    """``items`` in consecutive groups, at most ``task_runs`` of them (default
    :data:`GROUP_TASK_RUNS`), as even as the count allows; one item a group when
    there are no more items than task runs.

    Grouping is deterministic (the order of ``items``), so the same run again
    forms the same groups and finds them in the cache.
    """
    size = math.ceil(len(items) / (task_runs or GROUP_TASK_RUNS)) if items else 1
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def group_outcome[K](
    results: list[Any], errors: Mapping[K, BaseException], incomplete: Sequence[str], total: int
) -> list[Any]:
    """A group's results when every item completed; else raise with each item's outcome.

    ``errors``: the items that raised (key → exception); ``incomplete``: how to
    name the items whose result says they did not complete.

    Raises
    ------
    GroupInterruptedError
        When an item raised a failure that may pass (the group is retried).
    GroupFailedError
        Otherwise, when an item did not complete.
    """
    if not incomplete and not errors:
        return results
    failures = {key: f"{type(e).__name__}: {e}" for key, e in errors.items()}
    named = [*incomplete, *(f"{key}: {reason}" for key, reason in failures.items())]
    message = f"{len(named)} of {total} incomplete: " + "; ".join(named[:5])
    transient = any(is_transient(e) for e in errors.values())
    error = GroupInterruptedError if transient else GroupFailedError
    raise error(message, results, failures)


def _first_line(message: str, limit: int = 300) -> str:
    """A failure's reason for the table: S3 clients add dozens of debug lines."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
