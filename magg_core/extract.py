"""Stage *extract*: read one granule once and store its points as a fragment per parent cell.

The unit of reading is the granule and the unit of gridding the cell (see
:mod:`magg_core.fragments`). This runs identically in a thread, a worker
process, the Lambda handler (its ``extract`` event) or a Dask worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import magg_core
from magg_core.config import PipelineConfig, load_config
from magg_core.fragments import (
    ExtractRecord,
    read_extract_record,
    write_extract_record,
    write_fragments,
)
from magg_core.read import GranuleReadError, permanent_failure, read_parents
from magg_core.s3 import S3Credentials, S3Endpoint
from magg_core.store import open_store


@dataclass(frozen=True)
class ExtractRequest:
    """One granule to extract for the parents the catalog lists it under."""

    granule_url: str
    parents: tuple[int, ...]
    store_path: str
    parent_order: int
    child_order: int
    s3_credentials: S3Credentials | None = None
    config: Mapping[str, Any] | None = None

    def pipeline_config(self) -> PipelineConfig:
        config = load_config(self.config)
        if (config.output.parent_order, config.output.child_order) != (
            self.parent_order,
            self.child_order,
        ):
            config = config.with_orders(self.parent_order, self.child_order)
        return config


@dataclass(frozen=True)
class ExtractResult:
    """What one extract did; ``reused`` when the store already held it for these inputs."""

    url: str
    status: str
    points: int = 0
    parents: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    reason: str | None = None
    reused: bool = False


def extract_fingerprint(url: str, parents: tuple[int, ...], config: PipelineConfig) -> str:
    """A hash of everything an extract's fragments depend on."""
    material = {
        "granule": url,
        "parents": sorted(str(p) for p in parents),
        "config": config.hash,
        "magg": magg_core.__version__,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def extract_granule(
    request: ExtractRequest, *, endpoint: S3Endpoint | None = None
) -> ExtractResult:
    """Read the granule once and store one fragment per listed parent, then its record.

    An extract the store already holds for the same inputs (granule, parents,
    config, magg version) is not read again: a retried or resumed run costs
    one small GET per granule that finished.

    Returns
    -------
    ExtractResult
        ``status`` ``ok``, or ``failed`` for a granule that cannot be read
        (missing, truncated, corrupt, unsupported): its record says why, and
        every cell it touches will be ``partial``.

    Raises
    ------
    magg_core.errors.TransientReadError, magg_core.errors.CredentialsRejectedError
        For failures that say nothing about the granule (throttling, network,
        refused credentials): retry the extract, with fresh credentials.
    """
    started = time.perf_counter()
    endpoint = endpoint or S3Endpoint.from_env()
    config = request.pipeline_config()
    store = open_store(request.store_path, endpoint=endpoint)
    url = request.granule_url
    fingerprint = extract_fingerprint(url, request.parents, config)
    done = read_extract_record(store, config, url)
    if done is not None and done.status == "ok" and done.fingerprint == fingerprint:
        return ExtractResult(
            url=url,
            status="ok",
            points=sum(done.points.values()),
            parents=len(done.points),
            reused=True,
            duration_s=time.perf_counter() - started,
        )
    try:
        read = read_parents(
            url, request.parents, config, credentials=request.s3_credentials, endpoint=endpoint
        )
    except GranuleReadError as exc:
        failure = permanent_failure(exc)
        write_extract_record(
            store,
            config,
            ExtractRecord(url=url, status="failed", fingerprint=fingerprint, reason=failure.reason),
        )
        return ExtractResult(
            url=url,
            status="failed",
            reason=failure.reason,
            duration_s=time.perf_counter() - started,
        )
    written = write_fragments(store, config, url, read.points)
    counts = {str(p): len(points) for p, points in read.points.items()}
    write_extract_record(
        store,
        config,
        ExtractRecord(
            url=url,
            status="ok",
            fingerprint=fingerprint,
            points=counts,
            bytes_fetched=read.bytes_fetched,
        ),
    )
    return ExtractResult(
        url=url,
        status="ok",
        points=sum(counts.values()),
        parents=len(counts),
        bytes_fetched=read.bytes_fetched,
        bytes_written=written,
        duration_s=time.perf_counter() - started,
    )
