"""magg_core: the cloud-agnostic heart of magg.

Pure functions and small dataclasses that turn ATL06 granules into per-cell
HEALPix statistics in a Zarr store. Nothing here imports Prefect, so the same
code runs in a thread, in the AWS Lambda handler, and in an ECS flow run.
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "magg-icesat2"
"""magg's name on the package index (``magg`` there is an unrelated project)."""

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"
