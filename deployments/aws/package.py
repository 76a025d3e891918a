"""Build the Lambda function zip and its dependency layer.

The function zip holds only the handler and ``magg_core`` (a few hundred KB),
so code updates upload in a second; the layer holds the third-party packages
the handler imports, built for the Lambda runtime (Python 3.12 on arm64)
from binary wheels only — no compiler, no Docker, and the same pins as
``constraints.txt``. Prefect never enters either: the layer's requirements
list only what the handler's import graph needs, and both builds refuse to
finish if a ``prefect`` package or import shows up.

Lambda limits the *unzipped* function plus its layers to 250 MB
(262,144,000 bytes), so the layer build measures the unzipped tree and fails
above the limit instead of leaving the discovery to ``create-function``.

Usage (from the repository root)::

    python -m deployments.aws.package function   # → build/lambda/function.zip
    python -m deployments.aws.package layer      # → build/lambda/layer-arm64.zip
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD_DIR = REPO_ROOT / "build" / "lambda"

LAMBDA_UNZIPPED_LIMIT = 262_144_000
"""Function code plus all layers, unzipped (AWS: "250 MB")."""

LAMBDA_PYTHON = "3.12"
LAMBDA_GLIBC = (2, 34)
"""glibc of the python3.12 runtime (Amazon Linux 2023)."""
LAMBDA_PLATFORMS = ("manylinux2014_aarch64",) + tuple(
    f"manylinux_2_{minor}_aarch64" for minor in range(17, LAMBDA_GLIBC[1] + 1)
)
"""Every wheel tag the arm64 python3.12 runtime can load.

pip matches ``--platform`` tags literally (it does not widen
``manylinux_2_28`` to older glibc versions), and packages differ: obstore
ships ``manylinux_2_24``, numpy ≥ 2.3 ``manylinux_2_28``, others
``manylinux2014``. So the build names each glibc version up to the runtime's.
"""

NO_DEPS = ("h5coro",)
"""Installed without their declared dependencies.

h5coro declares earthaccess, xarray and boto3 for features magg does not use
in a cell (it reads through magg's own driver); pulling them in would add
~100 MB and s3fs/aiobotocore to every cold start.
"""

FUNCTION_FILES = (
    "deployments/__init__.py",
    "deployments/aws/__init__.py",
    "deployments/aws/lambda_handler.py",
)
FUNCTION_PACKAGE = "magg_core"
FUNCTION_SUFFIXES = (".py", ".yaml", ".geojson")
"""Code plus the package data a cell reads (built-in configs, region outlines)."""

HANDLER = "deployments.aws.lambda_handler.lambda_handler"

_PREFECT_IMPORT = re.compile(r"^\s*(import|from)\s+prefect(_\w+)?\b", re.MULTILINE)


class PackageError(RuntimeError):
    """A package that must not be deployed; the message says why."""


@dataclass(frozen=True)
class Built:
    """A built zip and the size Lambda counts against its limit."""

    path: Path
    unzipped_bytes: int
    zipped_bytes: int

    def describe(self) -> str:
        return (
            f"{self.path}: {self.unzipped_bytes / 1e6:.1f} MB unzipped, "
            f"{self.zipped_bytes / 1e6:.1f} MB zipped"
        )


def build_function(output: Path = BUILD_DIR / "function.zip") -> Built:
    """Zip the handler and ``magg_core`` with their package paths kept.

    The paths stay as in the repository so the handler setting is
    ``deployments.aws.lambda_handler.lambda_handler`` and the handler's own
    ``from magg_core…`` imports resolve from the function root.

    Raises
    ------
    PackageError
        If any zipped module imports Prefect.
    """
    files = [REPO_ROOT / name for name in FUNCTION_FILES] + sorted(
        p
        for p in (REPO_ROOT / FUNCTION_PACKAGE).rglob("*")
        if p.is_file() and p.suffix in FUNCTION_SUFFIXES and "__pycache__" not in p.parts
    )
    offenders = [
        str(p.relative_to(REPO_ROOT))
        for p in files
        if p.suffix == ".py" and _PREFECT_IMPORT.search(p.read_text())
    ]
    if offenders:
        raise PackageError(f"the Lambda function must not import prefect: {', '.join(offenders)}")
    return _zip({p.relative_to(REPO_ROOT).as_posix(): p for p in files}, output)


def build_layer(
    output: Path = BUILD_DIR / "layer-arm64.zip",
    *,
    python_version: str = LAMBDA_PYTHON,
    platforms: tuple[str, ...] = LAMBDA_PLATFORMS,
    function_bytes: int = 0,
    keep_tree: Path | None = None,
) -> Built:
    """pip-install the layer's requirements for the target runtime and zip them.

    Parameters
    ----------
    output
        The layer zip; its tree is ``python/…`` as Lambda expects.
    python_version, platforms
        The target runtime. The defaults are Lambda's python3.12 on arm64;
        the tests also build for the host to import the handler from it.
    function_bytes
        The function's unzipped size, counted against the same limit.
    keep_tree
        Also leave the unzipped tree here (``<keep_tree>/python``).

    Raises
    ------
    PackageError
        If Prefect is in the layer or the unzipped total reaches Lambda's limit.
    subprocess.CalledProcessError
        If pip cannot find binary wheels for the target (its output says which).
    """
    with tempfile.TemporaryDirectory(prefix="magg-layer-") as tmp:
        site = Path(tmp) / "python"
        target = [
            "--target",
            str(site),
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--only-binary=:all:",
            *(arg for platform in platforms for arg in ("--platform", platform)),
            "--constraint",
            str(REPO_ROOT / "constraints.txt"),
            "--no-compile",
            "--disable-pip-version-check",
            "--quiet",
        ]
        pip = [sys.executable, "-m", "pip", "install", *target]
        subprocess.run([*pip, "-r", str(HERE / "layer-requirements.txt")], check=True)
        subprocess.run([*pip, "--no-deps", *NO_DEPS], check=True)
        _strip(site)
        forbidden = sorted(p.name for p in site.iterdir() if p.name.lower().startswith("prefect"))
        if forbidden:
            raise PackageError(f"the layer must not contain prefect, found {forbidden}")
        unzipped = _tree_bytes(site)
        if unzipped + function_bytes >= LAMBDA_UNZIPPED_LIMIT:
            raise PackageError(
                f"layer ({unzipped / 1e6:.1f} MB) plus function ({function_bytes / 1e6:.1f} MB) "
                f"reach Lambda's unzipped limit of {LAMBDA_UNZIPPED_LIMIT / 1e6:.0f} MB"
            )
        if keep_tree is not None:
            shutil.rmtree(keep_tree, ignore_errors=True)
            shutil.copytree(site, keep_tree / "python")
        files = {p.relative_to(tmp).as_posix(): p for p in sorted(site.rglob("*")) if p.is_file()}
        return _zip(files, output)


def _strip(site: Path) -> None:
    """Drop what never runs in a cell: caches, console scripts, and the
    top-level ``tests`` package h5coro's wheel ships (its own test suite)."""
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache)
    for junk in ("bin", "tests"):
        shutil.rmtree(site / junk, ignore_errors=True)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _zip(files: dict[str, Path], output: Path) -> Built:
    """Write ``files`` (archive name → path) atomically; deterministic order and times."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, path in sorted(files.items()):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    os.replace(tmp, output)
    return Built(
        path=output,
        unzipped_bytes=sum(p.stat().st_size for p in files.values()),
        zipped_bytes=output.stat().st_size,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.aws.package", description=__doc__)
    parser.add_argument("what", choices=("function", "layer"))
    parser.add_argument("--output", type=Path, help="zip to write (default under build/lambda/)")
    args = parser.parse_args(argv)
    try:
        if args.what == "function":
            built = build_function(*([args.output] if args.output else []))
        else:
            function = build_function()
            built = build_layer(
                *([args.output] if args.output else []), function_bytes=function.unzipped_bytes
            )
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(built.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
