"""Where the local and dask backends run extracts and cells: worker processes.

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
import multiprocessing.forkserver
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager

from magg_core.grid.cell import process_cell
from magg_core.height_change.cell import process_height_change
from magg_core.schema import CellRequest, CellResult, HeightChangeRequest

PRELOAD = ["magg_core.grid.cell", "magg_core.extract.granule", "magg_core.height_change.cell"]
TASKS_PER_PROCESS = 2
"""Tasks the local backend keeps in flight per worker process (see :func:`local_workers`)."""
CELLS_PER_PROCESS = 4
"""Cells a worker process grids at once (:func:`process_cells_within`)."""


def default_workers() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start_forkserver() -> multiprocessing.context.BaseContext:
    """Start the forkserver that preloads magg, if it is not running; its context.

    Idempotent. The CLI calls it as soon as it knows a run needs worker
    processes, so the forkserver's imports (~1–2 s of CPU) overlap the CLI's
    own start-up instead of delaying the first task.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return context


class WorkerPool(ProcessPoolExecutor):
    """A process pool whose ``slots`` say how many of its processes are free.

    The local backend keeps more work in flight than processes; work that is
    handed credentials takes a slot first (:func:`take_slot`), so they are
    fetched when a process is free to use them at once, not before a wait in
    the pool's queue that could outlast their refresh margin.
    """

    def __init__(self, workers: int, **options):
        super().__init__(max_workers=workers, **options)
        self.slots = threading.BoundedSemaphore(workers)


def worker_pool(workers: int) -> WorkerPool:
    """A pool of ``workers`` processes forked from a forkserver that preloaded magg."""
    return WorkerPool(
        workers,
        mp_context=start_forkserver(),
        initializer=_take_environment,
        initargs=(dict(os.environ),),
    )


def take_slot(workers: Executor) -> Callable[[Future], None]:
    """Wait until one of ``workers``' processes (or threads of a Dask cluster) is free and
    take it; the callback that gives it back, to add to the future of the work run there.

    An executor without ``slots`` queues work itself and is not waited for.
    """
    slots = getattr(workers, "slots", None)
    if slots is None:
        return lambda _: None
    slots.acquire()
    return lambda _: slots.release()


@contextmanager
def local_workers(
    backend: str, concurrency: int | None, dask_address: str | None
) -> Iterator[tuple[Executor, int]]:
    """The executor of the ``local`` or ``dask`` backend, and how many tasks to keep in flight.

    ``local``: :func:`worker_pool`, ``concurrency`` processes (default one per
    core), and twice as many tasks in flight: each task run costs the flow
    ~10–60 ms of Prefect bookkeeping before and after its work (creating the
    run, cache look-up, states, the persisted result), and with one task per
    process the process idled through it; the second task now does its
    bookkeeping meanwhile and waits for a free process (:func:`take_slot`).
    A cell's deadline starts when a process takes it (:func:`process_cell_within`).
    ``dask``: :func:`dask_workers` at ``dask_address``, as many tasks as the
    cluster has threads unless ``concurrency`` says otherwise.

    Raises
    ------
    ValueError
        For ``dask`` without ``dask_address``, or another backend.
    """
    if backend == "local":
        processes = concurrency or default_workers()
        with worker_pool(processes) as pool:
            yield pool, TASKS_PER_PROCESS * processes
    elif backend == "dask":
        if not dask_address:
            raise ValueError("backend dask needs dask_address (the scheduler's address)")
        with dask_workers(dask_address) as (executor, threads):
            yield executor, concurrency or threads
    else:
        raise ValueError(f"not a backend of worker processes: {backend!r}")


def _take_environment(environment: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environment)


@contextmanager
def dask_workers(address: str) -> Iterator[tuple[Executor, int]]:
    """An executor over an existing Dask cluster, and how many tasks it runs at once.

    HPC users start the cluster themselves (dask-jobqueue on SLURM or PBS, or
    ``dask scheduler`` plus ``dask worker``) and give its scheduler address.
    The work is submitted impure, so a retried cell runs again rather than
    reusing the failed attempt's result. Requests travel to the workers over
    Dask's own connection, credentials included, and never through anything
    Prefect stores. Its ``slots`` (one a thread of the cluster) bound the
    granules handed credentials and waiting in Dask's queue, as the local
    pool's do (:func:`take_slot`).
    """
    from distributed import Client

    client = Client(address, set_as_default=False, timeout=30)
    try:
        threads = max(sum(client.nthreads().values()), 1)
        executor = client.get_executor(pure=False)
        executor.slots = threading.BoundedSemaphore(threads)  # see take_slot
        yield executor, threads
    finally:
        client.close()


def process_cell_within(request: CellRequest, timeout_s: float) -> CellResult:
    """:func:`process_cell` with its deadline ``timeout_s`` from now, on the worker's own clock.

    A monotonic instant means nothing on another machine of a Dask cluster,
    so the deadline is set where the cell runs.
    """
    return process_cell(request, deadline=time.monotonic() + timeout_s)


def process_cells_within(
    requests: list[CellRequest], timeout_s: float
) -> list[CellResult | Exception]:
    """:func:`process_cell_within` for each of ``requests``, :data:`CELLS_PER_PROCESS` at
    once in threads; each cell's result, or the exception it raised, in order.

    A cell waits on the store for most of its time when the store is remote
    (a template check, its fragments, its chunks, its record: four round trips,
    ~180 ms a cell behind 30 ms of latency), so one cell at a time would leave
    the process idle; numpy's sorting and zlib release the interpreter lock
    for the rest.
    """
    with ThreadPoolExecutor(min(len(requests), CELLS_PER_PROCESS)) as threads:
        futures = [threads.submit(process_cell_within, r, timeout_s) for r in requests]
    return [f.exception() or f.result() for f in futures]  # type: ignore[misc]


def process_height_change_within(request: HeightChangeRequest, timeout_s: float) -> CellResult:
    """:func:`process_height_change` with its deadline ``timeout_s`` from now, on the worker."""
    return process_height_change(request, deadline=time.monotonic() + timeout_s)
