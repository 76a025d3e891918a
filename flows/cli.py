"""The ``magg`` command line: the front door to the flows.

``magg demo``     the main job on the built-in sample, locally, no AWS needed
``magg catalog``  CMR granules of a cycle × the region's cells → catalog file
``magg run``      the ``process-cycle`` flow on a catalog or a cycle
``magg height-change``  the ``height-change`` flow: dh/dt across cycles' kept fragments
``magg inspect``  what a store holds: pyramid levels, per-cell records and provenance
``magg plot``     a quicklook PNG of a statistic at any level
``magg upgrade``  rewrite an older store's DGGS attributes as written today
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlsplit

import magg
from magg_core.urls import parse_s3_url


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error is one line on stderr and a non-zero exit code.

    Prefect's console logging is off unless ``--debug``: a failed flow run
    logs its traceback there, while the error itself is what a user needs —
    the run's logs, tracebacks included, still reach the Prefect API (the UI).
    Prefect reads this when first imported, which the commands do lazily, so
    it takes effect when ``main`` is the process's entry point (the ``magg``
    script, which passes no ``argv``: that process then ends as soon as its
    exit handlers have run, :class:`_LeavePromptly`).
    """
    if argv is None:  # the ``magg`` script: this call is the whole process
        leave = _LeavePromptly()
        atexit.register(leave)  # first registered, so it runs after every other exit handler
        leave.code = _main(None)
        return leave.code
    return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    magg._prefect_defaults()
    if not args.debug:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    try:
        flows = getattr(args, "flows", False)
        server = _temporary_server() if flows else None
        if args.name == "run":
            _check_run_inputs(args)
        if flows:
            _start_up(args, server)
        with server.settings() if server is not None else nullcontext():
            return args.command(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's job is a clear one-line error
        if args.debug:
            raise
        print(f"magg {args.name}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _check_run_inputs(args: argparse.Namespace) -> None:
    """What ``magg run`` can refuse before its flow starts (~5–10 s): a catalog file that does
    not load, or neither a catalog nor a cycle or date range to query CMR for.

    Raises
    ------
    CatalogError, CycleError
        Naming the file, or saying what to give.
    """
    from magg_core.catalog.catalog import load_catalog, query_time_range
    from magg_core.cycles import CycleError

    if args.catalog is not None:
        load_catalog(args.catalog)
        return
    try:
        query_time_range(args.cycle, args.start_date, args.end_date)
    except CycleError as exc:
        raise CycleError(f"{exc}, or a --catalog file") from None


def _temporary_server() -> _TemporaryServer | None:
    """Prefect's temporary API server, launched now, when no server is configured.

    Started the default way, it begins only when the flow first calls the API
    -- after this process has imported the flows (~3 s of CPU) and the
    server's own web application (~2.5 s, only to launch it). Its own start
    (~4 s) is the longest step before a flow can run, so it goes first: before
    ``magg run`` checks its inputs (~0.5 s; a refused input stops it again at
    exit) and before Prefect is imported here (~1 s). Only then do Prefect's
    settings say whether a server is configured elsewhere than in the
    environment (a profile, ``prefect.toml``) or temporary servers are off;
    if so, the server just launched is stopped, having cost ~1 s of its CPU.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    server = _TemporaryServer()
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url is None and settings.server.ephemeral.enabled:
        server.serve_this_process(settings.server.ephemeral.startup_timeout_seconds)
        return server
    server.stop()
    return None


def _start_up(args: argparse.Namespace, server: _TemporaryServer | None) -> None:
    """Start at once, in other processes, what a flow command waits for later.

    The worker processes' forkserver would start only when the first task is
    dispatched; started here, beside the temporary server, its CPU overlaps
    this process's imports. The imports of the command's flow, and the one
    Prefect makes when it creates the flow run, then run here too, before
    waiting for the server to answer.
    """
    if args.name == "demo" or (args.backend == "local" and not getattr(args, "dry_run", False)):
        from magg.tasks.workers import start_forkserver

        start_forkserver()
    if args.name == "height-change":
        import magg.flows.height_change  # noqa: F401
    else:
        import magg.flows.process_cycle  # noqa: F401
    import fastapi.encoders  # noqa: F401 - Prefect's, for a flow run's parameters (~0.25 s)

    if server is not None:
        server.wait()


class _LeavePromptly:
    """The ``magg`` script's last exit handler: leave without tearing the interpreter down.

    Once every other exit handler has run (Prefect has sent its logs and
    events, the temporary server and the worker processes are stopped),
    Python would still destroy every module and object one by one: ~0.8 s of
    a run here, for nothing a user keeps. This ends the process with its
    exit code right then, after flushing the logs and the terminal. An
    exception that ends ``main`` leaves :attr:`code` unset, and Python's
    usual exit runs instead (traceback, argparse's exit code 2).
    """

    def __init__(self) -> None:
        self.code: int | None = None

    def __call__(self) -> None:
        if self.code is None:
            return
        logging.shutdown()  # registered before this handler, so it would run after it
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing left to save
                pass
        os._exit(self.code)


class _TemporaryServer:
    """Prefect's temporary API server, launched the way Prefect launches it, for this process.

    The same uvicorn command and environment as Prefect's own
    ``SubprocessASGIServer`` (its database in ``PREFECT_HOME``), made this
    process's API through ``PREFECT_API_URL``, stopped at exit after Prefect
    has flushed its logs and events (exit handlers run last-registered first).

    It lives for one run and serves no UI, so it does not keep what only a
    lasting server's UI shows: task runs' states, the event feed, automations
    (:data:`QUIET_SERVICES`). Recording three state events per task run into
    SQLite took this server ~4–6 s of CPU on a 256-task run (24 granules, 232
    cells), on the cores the workers need. The flow run, its logs and
    artifacts are kept; every cell's outcome is in the store's records, the
    run's summary and its table. A run that wants them all sets
    ``PREFECT_API_URL`` to a lasting server (``prefect server start``), or these
    variables itself, which then win.
    """

    QUIET_SERVICES = {
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    }

    def __init__(self) -> None:
        self.timeout_s = 0.0
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        # The same settings as this process: the server reads the same
        # environment, profile and files (PREFECT_HOME, the working directory).
        self.environment = {
            **self.QUIET_SERVICES,
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        prefect = importlib.util.find_spec("prefect")  # found, not imported (~1 s)
        if prefect is None or prefect.origin is None:
            raise RuntimeError("Prefect is not installed")
        self.app_dir = str(Path(prefect.origin).resolve().parents[1])
        self.process = self._launch()
        atexit.register(self.stop)

    def serve_this_process(self, timeout_s: float) -> None:
        """Make this server this process's Prefect API; :meth:`wait` allows ``timeout_s``."""
        import prefect.context

        self.timeout_s = timeout_s
        os.environ["PREFECT_API_URL"] = self.url
        prefect.context.refresh_global_settings_context()

    def settings(self) -> AbstractContextManager:
        """Prefect's settings for a flow run on this server: no flow-run heartbeats.

        Heartbeats let a lasting server mark a run whose process died as
        crashed; this server dies with the run. The heartbeat thread sleeps in
        one-second steps and the flow's end waits for it: up to 1 s a run.
        """
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})

    def _launch(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", self.app_dir]
            + ["--factory", "prefect.server.api.server:create_app"]
            + ["--host", "127.0.0.1", "--port", str(self.port)]
            + ["--log-level", "error", "--lifespan", "on"],
            env=self.environment,
        )

    def wait(self) -> None:
        """Return once the server answers; raise if it exits or stays silent too long."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == 3:  # uvicorn: the port was taken meanwhile
                self.process = self._launch()
            elif code is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {code}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"Prefect's temporary server did not answer within {self.timeout_s:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _one_line(exc: Exception) -> str:
    """The error's first line: S3 clients and parsers append pages of detail."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] + (" (more with --debug)" if len(lines) > 1 else "")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: the usage of ``magg run`` alone is
    five, and ``--help`` shows it to whoever wants it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _store_url(value: str) -> str:
    """``--store``: a path, a ``file://`` URL or ``s3://bucket/prefix`` (``{cycle}`` allowed).

    Checked here because the flow opens the store only after the catalog and
    the plan, and a dry run never does. A local store is a directory: a
    regular file at its path, or in place of one of its parents, would fail
    the run only once the cells are gridded.
    """
    try:
        scheme = urlsplit(value).scheme.lower()
        if scheme == "s3":
            parse_s3_url(value.replace("{cycle}", "00"))
        elif scheme not in ("", "file"):
            raise ValueError(f"scheme {scheme!r} is not a store (use a path, file:// or s3://)")
        else:
            _check_directory_path(_local_path(value).replace("{cycle}", "0"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value[:200]!r}: {exc}") from None
    return value


def _granule_mirror(value: str) -> str:
    """``--granule-mirror``: an existing directory, or an ``s3://bucket/prefix``.

    A directory that is not there would fail every granule of the run as
    "not found" (each cell ``partial``), after the catalog and the template.
    """
    try:
        if urlsplit(value).scheme.lower() == "s3":
            parse_s3_url(value)
        else:
            path = Path(_local_path(value))
            if not path.exists():
                raise ValueError("no such directory")
            if not path.is_dir():
                raise ValueError("is not a directory")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value[:200]!r}: {exc}") from None
    return value


def _absent(store: str) -> str:
    """`` (no such directory)`` for a local store path that does not exist, else ``""``:
    a store that is not there and a directory that holds no store are told apart."""
    if urlsplit(store).scheme.lower() in ("", "file") and not Path(_local_path(store)).exists():
        return " (no such directory)"
    return ""


def _local_path(value: str) -> str:
    """A local path argument, given as a path or a ``file://`` URL."""
    parts = urlsplit(value)
    return unquote(parts.path) if parts.scheme.lower() == "file" else value


def _check_directory_path(path: str) -> None:
    """Refuse a store path that is, or lies under, an existing regular file."""
    for place in (Path(path), *Path(path).parents):
        if place.exists():
            if not place.is_dir():
                which = "is" if place == Path(path) else f"lies under {str(place)!r}, which is"
                raise ValueError(f"{which} an existing file, not a store directory")
            return


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="magg", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument(
        "--debug", action="store_true", help="show Prefect's logs and full tracebacks"
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {magg.__version__} ({magg.DISTRIBUTION})"
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job on the built-in sample")
    demo.add_argument("--dir", default="magg-demo", help="working directory (default ./magg-demo)")
    demo.add_argument("--granules", type=int, default=None, help="number of sample granules")
    demo.add_argument(
        "--height-change",
        action="store_true",
        help="three cycles of the sample, then the height-change flow and a dh/dt quicklook",
    )
    demo.set_defaults(command=_demo, name="demo", flows=True)

    catalog = sub.add_parser("catalog", help="build a cell → granule catalog from CMR")
    _add_selection(catalog)
    catalog.add_argument("--parent-order", type=int, default=6)
    catalog.add_argument(
        "--product-version",
        default="007",
        help="ATL06 release (CMR collection version) to catalog; others are reported",
    )
    catalog.add_argument("--output", "-o", default="catalog.json")
    catalog.set_defaults(command=_catalog, name="catalog")

    run = sub.add_parser("run", help="run the process-cycle flow")
    _add_selection(run)
    run.add_argument("--catalog", help="catalog file (skips the CMR query)")
    run.add_argument("--config", default="atl06", help="built-in config name or YAML path")
    run.add_argument(
        "--store", type=_store_url, help="output store URL (default: the config's, per cycle)"
    )
    run.add_argument("--backend", choices=("local", "dask", "lambda", "ecs"), default="local")
    run.add_argument("--dask-address", help="scheduler of the Dask cluster for --backend dask")
    run.add_argument(
        "--keep-fragments",
        action="store_true",
        help=(
            "keep the per-granule fragments after a complete run, for later runs and for "
            "`magg height-change`; with a config that has a height_change section (the "
            "built-in atl06 has) each point also keeps its latitude, longitude and time: "
            "34 instead of 10 bytes a point"
        ),
    )
    run.add_argument("--cells", nargs="+", help="only these parent morton words")
    run.add_argument("--max-cells", type=int)
    run.add_argument("--dry-run", action="store_true")
    run.add_argument(
        "--accept-partial",
        action="store_true",
        help="write cells that lost some granules (reported 'partial'); exit 0 if none failed",
    )
    run.add_argument(
        "--credentials", choices=("earthdata", "environment", "none"), default="earthdata"
    )
    run.add_argument(
        "--concurrency", type=int, help="granules or cells in flight at once (local: processes)"
    )
    run.add_argument(
        "--granule-mirror",
        type=_granule_mirror,
        help="read granules from DIR_OR_S3_PREFIX/<name> instead of NSIDC",
    )
    run.add_argument("--lambda-function", default="magg-process-cell")
    run.set_defaults(command=_run, name="run", flows=True)

    change = sub.add_parser("height-change", help="run the height-change flow (dh/dt)")
    change.add_argument("--cycles", type=int, nargs="+", required=True, help="cycles to fit")
    change.add_argument(
        "--store",
        type=_store_url,
        nargs="+",
        help="the cycle stores: one pattern with {cycle} or one URL per cycle "
        "(default: the config's)",
    )
    change.add_argument("--output", "-o", type=_store_url, required=True, help="dh/dt store URL")
    change.add_argument("--config", default="atl06", help="the cycles' config")
    change.add_argument("--min-points", type=int, help="fewest points a child needs (10)")
    change.add_argument("--min-cycles", type=int, help="fewest distinct cycles (3)")
    change.add_argument("--rejection-threshold", type=float, help="robust sigmas (4)")
    change.add_argument("--max-iterations", type=int, help="rounds of rejection (5)")
    change.add_argument("--cells", nargs="+", help="only these parent morton words")
    change.add_argument("--concurrency", type=int, help="parents in flight (processes)")
    change.add_argument("--backend", choices=("local", "dask"), default="local")
    change.add_argument("--dask-address", help="scheduler of the Dask cluster for --backend dask")
    change.set_defaults(command=_height_change, name="height-change", flows=True)

    inspect = sub.add_parser("inspect", help="summarize what a store holds")
    inspect.add_argument("store")
    inspect.add_argument("--config", default="atl06")
    inspect.set_defaults(command=_inspect, name="inspect")

    plot = sub.add_parser("plot", help="quicklook PNG of a statistic")
    plot.add_argument("store")
    plot.add_argument("--variable", default="h_mean")
    plot.add_argument("--config", default="atl06")
    plot.add_argument(
        "--order", type=int, help="HEALPix order of the level to draw (default: the child order)"
    )
    plot.add_argument("--output", "-o", default="quicklook.png")
    plot.set_defaults(command=_plot, name="plot")

    upgrade = sub.add_parser(
        "upgrade", help="rewrite an older store's DGGS attributes as written today"
    )
    upgrade.add_argument("store")
    upgrade.set_defaults(command=_upgrade, name="upgrade")
    return parser


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycle", type=int, help="ICESat-2 cycle number")
    parser.add_argument("--start-date", help="YYYY-MM-DD (instead of --cycle)")
    parser.add_argument("--end-date", help="YYYY-MM-DD (instead of --cycle)")
    parser.add_argument("--region", default="antarctica", help="region name or GeoJSON path")
    parser.add_argument("--cmr-url", help="CMR search base URL (default: NASA's CMR)")


def _demo(args: argparse.Namespace) -> int:
    """Sample granules → catalog (same intersection code, no CMR) → the real flow."""
    from magg_core.catalog.catalog import catalog_from_records
    from magg_core.granules.sample import write_sample

    if args.height_change:
        return _demo_height_change(args)
    workdir = Path(args.dir).resolve()
    options = {} if args.granules is None else {"n_granules": args.granules}
    print(f"writing the built-in ATL06 sample to {workdir / 'granules'} …")
    granules = write_sample(workdir / "granules", **options)
    catalog = catalog_from_records([g.umm for g in granules], cycle=DEMO_CYCLE)
    catalog_path = catalog.write(workdir / "catalog.json")
    print(f"catalog: {len(catalog.cells)} cells, {catalog.granule_count} granules → {catalog_path}")

    store = workdir / "atl06.zarr"
    summary = _run_flow(
        catalog=str(catalog_path),
        store=str(store),
        backend="local",
        credentials="none",
        granule_mirror=str(workdir / "granules"),
    )
    print(summary["markdown"])
    png = _quicklook(str(store), "atl06", "h_mean", workdir / "quicklook.png")
    print(f"\nstore: {store}\nquicklook: {png}")
    return 0 if not summary["failed_cells"] else 1


DEMO_CYCLES = (20, 21, 22)
DEMO_CYCLE_GRANULES = 6
"""Passes of the height-change demo, each flown in every cycle (fits in under two minutes)."""


def _demo_height_change(args: argparse.Namespace) -> int:
    """Three cycles of the sample, each gridded keeping its fragments, then dh/dt."""
    from magg_core.catalog.catalog import catalog_from_records
    from magg_core.granules.sample import write_cycles

    workdir = Path(args.dir).resolve()
    n_granules = args.granules or DEMO_CYCLE_GRANULES
    print(f"writing {n_granules} passes in cycles {DEMO_CYCLES} to {workdir / 'cycles'} …")
    by_cycle = write_cycles(workdir / "cycles", DEMO_CYCLES, n_granules=n_granules)
    pattern = str(workdir / "atl06-cycle{cycle}.zarr")
    for cycle, granules in by_cycle.items():
        catalog = catalog_from_records([g.umm for g in granules], cycle=cycle)
        summary = _run_flow(
            catalog=str(catalog.write(workdir / f"catalog-{cycle}.json")),
            store=pattern.replace("{cycle}", str(cycle)),
            backend="local",
            credentials="none",
            granule_mirror=str(workdir / "cycles"),
            keep_fragments=True,
        )
        print(f"cycle {cycle}: {summary['cells']} cells, {summary['total_obs']:,} points")
        if summary["failed_cells"]:
            print(summary["markdown"])
            return 1
    output = workdir / "dhdt.zarr"
    summary = _run_height_change(
        cycles=list(DEMO_CYCLES), stores=pattern, output=str(output), backend="local"
    )
    print(summary["markdown"])
    png = _quicklook(str(output), "atl06", "dhdt", workdir / "dhdt.png")
    print(f"\nstore: {output}\nquicklook: {png}")
    return 0 if not summary["failed_cells"] else 1


def _height_change(args: argparse.Namespace) -> int:
    stores = args.store[0] if args.store and len(args.store) == 1 else args.store
    options = ("min_points", "min_cycles", "rejection_threshold", "max_iterations")
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    summary = _run_height_change(
        cycles=args.cycles,
        stores=stores,
        output=args.output,
        config=args.config,
        cells=args.cells,
        concurrency=args.concurrency,
        backend=args.backend,
        dask_address=args.dask_address,
        **given,
    )
    print(summary["markdown"])
    return 0 if not summary["failed_cells"] else 1


def _run_height_change(**parameters) -> dict:
    """Run ``height-change`` here; its summary, also when some parents failed."""
    with _LiveProgress.on_terminal():
        return magg.height_change(**parameters)


def _catalog(args: argparse.Namespace) -> int:
    from magg_core.catalog.catalog import build_catalog

    catalog = build_catalog(
        cycle=args.cycle,
        start=args.start_date,
        end=args.end_date,
        region=args.region,
        parent_order=args.parent_order,
        version=args.product_version,
        cmr_url=args.cmr_url,
    )
    path = catalog.write(args.output)
    print(
        f"{len(catalog.cells)} cells, {catalog.granule_count} granules, "
        f"{len(catalog.report)} granules in the report → {path}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    summary = _run_flow(
        cycle=args.cycle,
        start_date=args.start_date,
        end_date=args.end_date,
        region=args.region,
        cmr_url=args.cmr_url,
        catalog=args.catalog,
        config=args.config,
        store=args.store,
        backend=args.backend,
        cells=args.cells,
        max_cells=args.max_cells,
        dry_run=args.dry_run,
        credentials=args.credentials,
        concurrency=args.concurrency,
        granule_mirror=args.granule_mirror,
        accept_partial=args.accept_partial,
        keep_fragments=args.keep_fragments,
        dask_address=args.dask_address,
        lambda_function=args.lambda_function,
    )
    if args.dry_run:
        print(f"dry run: {len(summary['cells'])} cells would be processed into {summary['store']}")
        return 0
    print(summary["markdown"])
    return 0 if not summary["failed_cells"] else 1


def _inspect(args: argparse.Namespace) -> int:
    from collections import Counter

    from magg_core.config import load_config
    from magg_core.report.summary import describe_dropped
    from magg_core.store.arrays import open_store, read_template, store_levels
    from magg_core.store.records import read_records

    config = load_config(args.config)
    store = open_store(args.store, read_only=True)
    template = read_template(store, config)
    if template is None:
        raise ValueError(
            f"{args.store} has no magg template for config {config.name!r}{_absent(args.store)}"
        )
    records = read_records(store, config)
    statuses = Counter(r.result.status for r in records.values())
    missing = len(template.parents) - len(records)
    print(
        f"store {args.store}: {len(template.parents)} parent cells, config {template.config_hash}"
    )
    for level in store_levels(store, config):
        print(
            f"level {level.order}: group /{level.order}/, {level.cells:,} cells, "
            f"chunks of {level.chunk_cells:,} cells ({level.chunks:,} chunks)"
        )
    print(
        "records: "
        + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
        + f", not yet run {missing}"
    )
    dropped: Counter[str] = Counter()
    for record in records.values():
        dropped.update(record.result.dropped)
    points = sum(r.result.total_obs for r in records.values())
    print(f"points: {points:,} in the statistics, {describe_dropped(dropped)}")
    for parent, record in sorted(records.items()):
        r = record.result
        if r.status == "failed" or r.files_failed:
            print(
                f"  {parent}: {r.status} {r.error or ''} "
                + "; ".join(f"{f.url}: {f.reason}" for f in r.files_failed[:3])
            )
        elif not r.total_obs and sum(r.dropped.values()):
            print(f"  {parent}: {r.status}, every point left out: {describe_dropped(r.dropped)}")
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    """Attributes only (never array bytes).

    See ``magg_core.store.arrays.upgrade_dggs_attributes``.
    """
    from magg_core.store.arrays import open_store, upgrade_dggs_attributes

    groups = upgrade_dggs_attributes(open_store(args.store))
    if groups:
        print(f"{args.store}: DGGS attributes rewritten in groups {', '.join(groups)}")
    else:
        print(f"{args.store}: already current")
    return 0


def _plot(args: argparse.Namespace) -> int:
    print(_quicklook(args.store, args.config, args.variable, Path(args.output), args.order))
    return 0


DEMO_CYCLE = 22
"""The built-in sample's cycle (its granule names carry it)."""


def _run_flow(**parameters) -> dict:
    """Run ``process-cycle`` here; its summary, also when some cells failed."""
    with _LiveProgress.on_terminal():
        return magg.run(**parameters)


class _LiveProgress:
    """Bars for the run's stages on a terminal: done/total, failures so far, elapsed, ETA.

    A watcher of :mod:`magg_core.report.progress`, which the flow advances as each
    extract and cell finishes. Drawn on standard output only when it is a
    terminal, and erased when the run ends, so the summary printed next (and
    anything read from a pipe or a file) is exactly what it was without it.
    Each stage's ETA is rich's: its remaining items at the stage's recent rate.
    """

    def __init__(self, bars):
        self.bars = bars
        self.run_started: float | None = None
        self.stages: dict[str, int] = {}

    @classmethod
    @contextmanager
    def on_terminal(cls) -> Iterator[None]:
        if not sys.stdout.isatty():
            yield
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from magg_core.report.progress import watching

        bars = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stdout),
            transient=True,
        )
        live = cls(bars)
        with bars, watching(live.show):
            yield

    def show(self, progress) -> None:
        if progress.started != self.run_started:  # a new run (demo --height-change has four)
            self.run_started = progress.started
            for task in self.stages.values():
                self.bars.remove_task(task)
            self.stages = {}
            if progress.extracts_total:
                self.stages["extracts"] = self.bars.add_task(
                    "extracts", total=progress.extracts_total, failed=""
                )
            self.stages["cells"] = self.bars.add_task(
                "cells", total=progress.cells_total, failed="", start=not progress.extracts_total
            )
        for stage, done, failed in (
            ("extracts", progress.extracts_done, progress.extracts_failed),
            ("cells", progress.cells_done, progress.cells_failed),
        ):
            if stage not in self.stages:
                continue
            task = self.stages[stage]
            if stage == "cells" and progress.extracts_done == progress.extracts_total:
                self.bars.start_task(task)  # the cells' clock starts with their stage
            self.bars.update(task, completed=done, failed=f"{failed} failed" if failed else "")


def _quicklook(
    store_path: str, config_name: str, variable: str, path: Path, order: int | None = None
) -> Path:
    import xarray as xr

    from magg_core.config import load_config
    from magg_core.report.quicklook import quicklook
    from magg_core.store.arrays import open_store, store_levels

    config = load_config(config_name)
    store = open_store(store_path, read_only=True)
    order = config.output.child_order if order is None else order
    present = [level.order for level in store_levels(store, config)]
    if not present:
        raise ValueError(
            f"{store_path} holds no magg store made with config {config.name!r}"
            f"{_absent(store_path)}"
        )
    if order not in present:
        raise ValueError(
            f"--order {order}: {store_path} has levels {', '.join(map(str, present)) or 'none'}"
        )
    return quicklook(xr.open_zarr(store, group=str(order)), path, variable)
