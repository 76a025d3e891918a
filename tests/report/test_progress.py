"""The run's progress counter and its watchers (no Prefect, no display)."""

from __future__ import annotations

import pytest

from magg_core.report.progress import Progress, RunProgress, watching


def test_watchers_see_every_finished_item_and_the_failures_so_far():
    seen: list[Progress] = []
    with watching(seen.append):
        run = RunProgress(extracts=2, cells=3)
        run.extract_done(ok=True)
        run.extract_done(ok=False)
        run.cell_done(ok=True)
    run.cell_done(ok=False)  # a watcher registered for the run sees it to the end
    other = RunProgress(extracts=1, cells=1)  # started after: not watched

    assert [(p.extracts_done, p.extracts_failed, p.cells_done, p.cells_failed) for p in seen] == [
        (0, 0, 0, 0),
        (1, 0, 0, 0),
        (2, 1, 0, 0),
        (2, 1, 1, 0),
        (2, 1, 2, 1),
    ]
    last = seen[-1]
    assert last.failures == 2 and last.fraction == pytest.approx(4 / 5)
    assert last.started == seen[0].started and last.elapsed_s() >= 0
    assert other.state.fraction == 0.0 and len(seen) == 5


def test_a_broken_watcher_is_dropped_and_the_run_goes_on():
    calls: list[int] = []

    def broken(progress: Progress) -> None:
        calls.append(progress.cells_done)
        if progress.cells_done == 1:
            raise RuntimeError("terminal gone")

    run = RunProgress(extracts=0, cells=3, watchers=(broken,))
    for _ in range(3):
        run.cell_done(ok=True)

    assert calls == [0, 1] and run.state.cells_done == 3 and run.state.fraction == 1.0
