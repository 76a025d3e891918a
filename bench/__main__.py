"""``python -m bench [--quick]``: every benchmark, one after another, each in its own process.

Separate processes because each benchmark starts its own servers and two of
them point Prefect at a throw-away home before importing it.
"""

from __future__ import annotations

import subprocess
import sys

from bench._common import REPO, parser

BENCHMARKS = (
    "statistics",
    "read",
    "orchestration",
    "memory",
    "end_to_end",
    "cycle",
    "levels",
    "extract",
    "floor",
)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== bench.{name} ===", flush=True)
        command = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        if subprocess.run(command, cwd=REPO).returncode:
            failed.append(name)
    if failed:
        print(f"\nfailed to run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
