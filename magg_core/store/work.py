"""What every unit of work shares: one parent's chunk, made under a deadline, timed, recorded.

A gridded cell (:func:`magg_core.grid.cell.process_cell`) and a parent of the
height-change product (:func:`magg_core.height_change.cell.process_height_change`)
compute different statistics from different inputs, but run the same skeleton:
time the read, the computation and the write; refuse to write after the
deadline (a thread cannot be killed, so an attempt that overran its timeout
must not write late, after a retry already has); note the process's peak
memory; and leave a record of the result beside the arrays, with the digests
of what it wrote (:mod:`magg_core.store.records`). That skeleton lives here,
once.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from zarr.abc.store import Store

from magg_core.config import PipelineConfig
from magg_core.errors import CellTimeoutError
from magg_core.schema import CellResult, Timings
from magg_core.store.records import CellRecord, write_record

Step = Literal["read", "aggregate", "write"]


@dataclass
class UnitOfWork:
    """One parent's attempt: its timings so far and the instant it must not write after.

    ``deadline`` is a ``time.monotonic()`` instant, or ``None`` for none.
    """

    parent_morton: int
    deadline: float | None = None
    timings: Timings = field(default_factory=Timings)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def timed(self, step: Step) -> Iterator[None]:
        """Add the block's wall time (seconds) to ``timings.<step>``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.timings, step, getattr(self.timings, step) + time.perf_counter() - t0)

    def check_deadline(self) -> None:
        """Raise before a write that would come too late.

        Raises
        ------
        CellTimeoutError
            If the deadline has passed; nothing has been written.
        """
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CellTimeoutError(
                f"cell {self.parent_morton} passed its deadline; nothing was written"
            )

    def finish(self, result: CellResult) -> CellResult:
        """``result`` with the total time (s) and the peak memory (MiB) of this attempt."""
        self.timings.total = time.perf_counter() - self.started
        result.duration_s = self.timings
        result.peak_rss_mb = peak_rss_mb()
        return result


def record_result(
    store: Store,
    config: PipelineConfig,
    result: CellResult,
    fingerprint: str,
    outputs: Mapping[str, str | None] | None = None,
) -> None:
    """Store a unit's record: its result, the fingerprint of its inputs, when, and the
    digests of the objects it wrote (``outputs``: key → SHA-256, ``None`` for removed)."""
    record = CellRecord(
        result=result,
        fingerprint=fingerprint,
        written_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        outputs=dict(outputs or {}),
    )
    write_record(store, config, record)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (what Lambda bills against).

    In the thread backend this is the whole process's peak, shared by all cells.
    ``getrusage``'s ``ru_maxrss`` is in KiB on Linux and in bytes on macOS
    (getrusage(2) on each).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024
    return round(peak * bytes_per_unit / 2**20, 1)
