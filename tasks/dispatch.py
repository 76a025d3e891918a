"""Dispatch: keep a window of task runs in flight and collect what each left.

Both gridding flows (``process-cycle``'s extracts and cells, ``height-change``'s
fits) submit their per-item tasks through :func:`run_windowed`, so a flow never
imports another flow for it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from typing import Any

from prefect.futures import PrefectFuture

from magg_core.errors import CellFailedError


def run_windowed[T, K](
    submit: Callable[[T], PrefectFuture],
    items: Iterable[T],
    window: int,
    on_done: Callable[[bool], None],
    key: Callable[[T], K],
) -> tuple[list[Any], dict[K, str]]:
    """Keep at most ``window`` tasks in flight; collect results and failures.

    Results include the failed and partial cells whose task raised with their
    result; ``failures`` are the items whose task ended without one (``key``
    → one-line reason). ``on_done(ok)`` is called as each task ends: ``ok``
    when it completed with a result whose status is not ``failed``.

    Submitting everything at once would start one thread per task; a window
    bounds threads and memory while keeping the backend saturated.
    """
    pending = iter(items)
    done: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    in_flight: dict[PrefectFuture, K] = {}
    results: list[Any] = []
    failures: dict[K, str] = {}

    def fill() -> None:
        while len(in_flight) < window:
            item = next(pending, None)
            if item is None:
                return
            future = submit(item)
            in_flight[future] = key(item)
            future.add_done_callback(done.put)

    fill()
    while in_flight:
        future = done.get()
        name = in_flight.pop(future)
        future.wait()  # sets the final state locally; the API may not have it yet
        state = future.state
        ok = state.is_completed()
        if ok:
            results.append(result := future.result())
            ok = getattr(result, "status", None) != "failed"  # an unreadable granule's extract
        elif isinstance(error := future.result(raise_on_failure=False), CellFailedError) and (
            error.result is not None
        ):
            results.append(error.result)  # a failed or partial cell, with its granules' reasons
        else:
            failures[name] = _first_line(state.message or state.name)
        on_done(ok)
        fill()
    return results, failures


def _first_line(message: str, limit: int = 300) -> str:
    """A failure's reason for the table: S3 clients add dozens of debug lines."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
