"""Stage *extract*: read one granule once and store its points as a fragment per parent cell.

The unit of reading is the granule and the unit of gridding the cell (see
:mod:`magg_core.store.fragments`). This runs identically in a thread, a worker
process, the Lambda handler (its ``extract`` event) or a Dask worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace

from zarr.abc.store import Store

import magg_core
from magg_core.access.s3 import S3Endpoint
from magg_core.config import PipelineConfig
from magg_core.granules.read import GranuleReadError, permanent_failure, read_parents
from magg_core.schema import ExtractRequest, ExtractResult
from magg_core.store.arrays import open_store
from magg_core.store.fragments import (
    ExtractRecord,
    fragments_intact,
    granule_name,
    read_extract_record,
    write_extract_record,
    write_fragments,
)


def extract_fingerprint(url: str, config: PipelineConfig) -> str:
    """A hash of what an extract's fragments depend on, besides which parents they are for:
    the granule, the config, the columns kept (with or without height change's) and magg."""
    material = {
        "granule": granule_name(url),
        "config": config.hash,
        "columns": list(config.point_columns),
        "magg": magg_core.__version__,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def extract_granule(
    request: ExtractRequest, *, endpoint: S3Endpoint | None = None
) -> ExtractResult:
    """Read the granule once and store one fragment per listed parent, then its record.

    An extract the store already holds for the same inputs (granule, config,
    magg version, the requested parents among its own) is not read again: a
    retried or resumed run costs one small GET per granule that finished.

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
    fingerprint = extract_fingerprint(url, config)
    done = _stored(store, config, request)
    if done is not None and done.status == "ok":
        return replace(done.as_found(), duration_s=time.perf_counter() - started)
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
    sizes = write_fragments(store, config, url, read.points)
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
            columns=list(config.point_columns),
            sizes=sizes,
        ),
    )
    return ExtractResult(
        url=url,
        status="ok",
        points=sum(counts.values()),
        parents=len(counts),
        bytes_fetched=read.bytes_fetched,
        bytes_written=sum(sizes.values()),
        duration_s=time.perf_counter() - started,
    )


def stored_extract(
    request: ExtractRequest, *, endpoint: S3Endpoint | None = None
) -> ExtractResult | None:
    """The outcome the store records for this extract, if it stands for this request.

    A success stands if it was made from the same granule, config and magg
    version for at least the requested parents (a later run restricted to a
    few cells reuses a whole-cycle extract), and the fragments of those
    parents are still in the store at the size written
    (:func:`magg_core.store.fragments.fragments_intact`); a failure, for the same inputs.
    """
    config = request.pipeline_config()
    store = open_store(request.store_path, endpoint=endpoint or S3Endpoint.from_env())
    return _stored(store, config, request)


def _stored(store: Store, config: PipelineConfig, request: ExtractRequest) -> ExtractResult | None:
    record = read_extract_record(store, config, request.granule_url)
    if record is None or record.fingerprint != extract_fingerprint(request.granule_url, config):
        return None
    if record.status == "ok" and not fragments_intact(store, config, record, request.parents):
        return None  # a fragment lost or cut short since: the extract is done again
    return ExtractResult(
        url=record.url,
        status=record.status,
        points=sum(record.points.values()),
        parents=len(record.points),
        bytes_fetched=record.bytes_fetched,
        reason=record.reason,
    )


def record_extract_failure(
    request: ExtractRequest, reason: str, *, endpoint: S3Endpoint | None = None
) -> None:
    """Record that the granule has no fragments because its extract raised (``reason``)."""
    config = request.pipeline_config()
    store = open_store(request.store_path, endpoint=endpoint or S3Endpoint.from_env())
    fingerprint = extract_fingerprint(request.granule_url, config)
    record = ExtractRecord(
        url=request.granule_url, status="failed", fingerprint=fingerprint, reason=reason
    )
    write_extract_record(store, config, record)
