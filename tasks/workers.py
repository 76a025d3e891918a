"""Worker processes for the local backend: every core busy.

Reading and aggregating are CPU-bound Python and numpy; in threads of one
process they share one interpreter lock and keep about one core busy. The
tasks stay threads of the flow (their states, retries and credential
refreshes happen here) and hand the work -- a plain request in, a plain
result out -- to a pool of worker processes.

Workers start from a *forkserver*, a clean process that imports magg once
and forks each worker from itself: forking the flow's own process would copy
locks held by its threads (the reader's dataset threads, Prefect's), which
deadlocked a fork-based pool here. The forkserver outlives pools and keeps
the environment of its own start, so each worker first takes the
environment the pool was created in (the run's S3 endpoint and identity).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

PRELOAD = ["magg_core.cell", "magg_core.extract"]


def default_workers() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes forked from a forkserver that preloaded magg."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_take_environment,
        initargs=(dict(os.environ),),
    )


def _take_environment(environment: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environment)
