"""A run's progress as its work items finish, for whoever watches it in this process.

The flows count finished extracts and cells here; watchers -- the CLI's live
display on a terminal, the flow's Prefect progress artifact -- are plain
callables that receive an immutable :class:`Progress` after every change. No
orchestration library is involved: a run started from Python code reports to
watchers registered with :func:`watching` in the same process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

Watcher = Callable[["Progress"], None]
"""Called with each new :class:`Progress`, on the thread that finished the work item.
It must return quickly: the run's dispatch loop waits for it."""


@dataclass(frozen=True)
class Progress:
    """How far a run is: counts of work items finished, and when it started.

    ``extracts_*`` count granules (stage one), ``cells_*`` parent cells (stage
    two, or the only stage of a run without extracts); ``*_failed`` are the
    finished items that did not succeed (a partial cell counts as failed).
    ``started`` is a :func:`time.monotonic` instant.
    """

    extracts_total: int
    cells_total: int
    started: float
    extracts_done: int = 0
    extracts_failed: int = 0
    cells_done: int = 0
    cells_failed: int = 0

    @property
    def failures(self) -> int:
        return self.extracts_failed + self.cells_failed

    @property
    def fraction(self) -> float:
        """Work items finished over all of them (1.0 for a run with none)."""
        total = self.extracts_total + self.cells_total
        return 1.0 if total == 0 else (self.extracts_done + self.cells_done) / total

    def elapsed_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started


_watchers: list[Watcher] = []
_lock = threading.Lock()


@contextmanager
def watching(watcher: Watcher) -> Iterator[None]:
    """Call ``watcher`` with the progress of every run that starts while this is active."""
    with _lock:
        _watchers.append(watcher)
    try:
        yield
    finally:
        with _lock:
            _watchers.remove(watcher)


class RunProgress:
    """The counter one run advances; tells its watchers after every change.

    The watchers are those registered with :func:`watching` when the run
    starts, plus ``watchers``. A watcher that raises is dropped with no effect
    on the run: progress is a view of the run, never a cause of its failure.
    """

    def __init__(self, extracts: int, cells: int, watchers: tuple[Watcher, ...] = ()):
        with _lock:
            self._watchers = [*_watchers, *watchers]
        self._lock = threading.Lock()
        self.state = Progress(extracts_total=extracts, cells_total=cells, started=time.monotonic())
        self._tell()

    def extract_done(self, ok: bool) -> None:
        """One granule's extract finished (``ok``: its fragments are written)."""
        with self._lock:
            s = self.state
            self.state = replace(
                s, extracts_done=s.extracts_done + 1, extracts_failed=s.extracts_failed + (not ok)
            )
        self._tell()

    def cell_done(self, ok: bool) -> None:
        """One cell finished (``ok``: complete, its statistics written)."""
        with self._lock:
            s = self.state
            self.state = replace(
                s, cells_done=s.cells_done + 1, cells_failed=s.cells_failed + (not ok)
            )
        self._tell()

    def _tell(self) -> None:
        state = self.state
        for watcher in list(self._watchers):
            try:
                watcher(state)
            except Exception:  # a broken display must not fail the run
                self._watchers.remove(watcher)
