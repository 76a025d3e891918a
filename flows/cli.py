"""The ``magg`` command line: the front door to the flows.

``magg demo``     the main job on the built-in sample, locally, no AWS needed
``magg catalog``  CMR granules of a cycle × the region's cells → catalog file
``magg run``      the ``process-cycle`` flow on a catalog or a cycle
``magg inspect``  what a store holds: per-cell records and provenance
``magg plot``     a quicklook PNG of a statistic
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's job is a clear one-line error
        if getattr(args, "debug", False):
            raise
        print(f"magg {args.name}: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job on the built-in sample")
    demo.add_argument("--dir", default="magg-demo", help="working directory (default ./magg-demo)")
    demo.add_argument("--granules", type=int, default=None, help="number of sample granules")
    demo.set_defaults(command=_demo, name="demo")

    catalog = sub.add_parser("catalog", help="build a cell → granule catalog from CMR")
    _add_selection(catalog)
    catalog.add_argument("--parent-order", type=int, default=6)
    catalog.add_argument("--output", "-o", default="catalog.json")
    catalog.set_defaults(command=_catalog, name="catalog")

    run = sub.add_parser("run", help="run the process-cycle flow")
    _add_selection(run)
    run.add_argument("--catalog", help="catalog file (skips the CMR query)")
    run.add_argument("--config", default="atl06", help="built-in config name or YAML path")
    run.add_argument("--store", help="output store URL (default: the config's, per cycle)")
    run.add_argument("--backend", choices=("local", "lambda", "ecs"), default="local")
    run.add_argument("--cells", nargs="+", help="only these parent morton words")
    run.add_argument("--max-cells", type=int)
    run.add_argument("--dry-run", action="store_true")
    run.add_argument(
        "--credentials", choices=("earthdata", "environment", "none"), default="earthdata"
    )
    run.add_argument("--concurrency", type=int, help="cells in flight at once")
    run.add_argument("--lambda-function", default="magg-process-cell")
    run.set_defaults(command=_run, name="run")

    inspect = sub.add_parser("inspect", help="summarize what a store holds")
    inspect.add_argument("store")
    inspect.add_argument("--config", default="atl06")
    inspect.set_defaults(command=_inspect, name="inspect")

    plot = sub.add_parser("plot", help="quicklook PNG of a statistic")
    plot.add_argument("store")
    plot.add_argument("--variable", default="h_mean")
    plot.add_argument("--config", default="atl06")
    plot.add_argument("--output", "-o", default="quicklook.png")
    plot.set_defaults(command=_plot, name="plot")
    return parser


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycle", type=int, help="ICESat-2 cycle number")
    parser.add_argument("--start-date", help="YYYY-MM-DD (instead of --cycle)")
    parser.add_argument("--end-date", help="YYYY-MM-DD (instead of --cycle)")
    parser.add_argument("--region", default="antarctica", help="region name or GeoJSON path")
    parser.add_argument("--cmr-url", help="CMR search base URL (default: NASA's CMR)")
