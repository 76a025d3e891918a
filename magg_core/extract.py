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
from dataclasses import asdict, dataclass, replace
from typing import Any

from zarr.abc.store import Store

import magg_core
from magg_core.config import PipelineConfig, load_config_at
from magg_core.fragments import (
    ExtractRecord,
    fragments_intact,
    granule_name,
    read_extract_record,
    write_extract_record,
    write_fragments,
)
from magg_core.grid import cell_word_problem
from magg_core.read import GranuleReadError, permanent_failure, read_parents
from magg_core.request import MAX_URL_PROBLEMS, CellRequest, EntryPoint, RequestError
from magg_core.s3 import S3Credentials, S3Endpoint
from magg_core.store import open_store

EXTRACT_EVENT = "extract"
"""The ``kind`` of a Lambda event that extracts a granule (a cell event has no ``kind``)."""


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
    height_change: bool = False
    """Keep the config's ``height_change`` columns (latitude, longitude, time) in the
    fragments: only a run that keeps its fragments for height change needs them
    (``magg run --keep-fragments``); otherwise a fragment holds the variables only."""

    @property
    def name(self) -> str:
        """The granule's file name."""
        return granule_name(self.granule_url)

    def to_event(self, *, include_credentials: bool = True) -> dict[str, Any]:
        """The JSON event form (``"kind": "extract"``); carries secrets unless told not to."""
        event: dict[str, Any] = {
            "kind": EXTRACT_EVENT,
            "granule_url": self.granule_url,
            "parents": [str(p) for p in self.parents],  # uint64 words stay exact as strings
            "store_path": self.store_path,
            "parent_order": self.parent_order,
            "child_order": self.child_order,
        }
        if include_credentials and self.s3_credentials is not None:
            event["s3_credentials"] = self.s3_credentials.to_event()
        if self.config is not None:
            event["config"] = dict(self.config)
        if self.height_change:
            event["height_change"] = True
        return event

    @classmethod
    def from_event(cls, event: Mapping[str, Any], entry: EntryPoint) -> ExtractRequest:
        """Validate an extract event sent to ``entry``; every problem in one :class:`RequestError`.

        The cell event's validation (:func:`magg_core.request.check_request`)
        applies to the granule, orders, config and store; each of ``parents``
        must besides be a distinct canonical morton word of ``parent_order``.
        """
        if not isinstance(event, Mapping):
            raise RequestError(f"event must be a JSON object, got {type(event).__name__}")
        parents = event.get("parents")
        if not isinstance(parents, list) or not parents:
            raise RequestError("parents must be a non-empty list of morton words")
        try:
            words = tuple(int(p) for p in parents if not isinstance(p, bool | float))
        except (TypeError, ValueError) as exc:
            raise RequestError("parents must be morton words (decimal strings)") from exc
        if len(words) != len(parents) or not all(0 <= w < 2**64 for w in words):
            raise RequestError("parents must be uint64 morton words (decimal strings)")
        height_change = event.get("height_change", False)
        if not isinstance(height_change, bool):
            raise RequestError("height_change must be true or false")
        own = ("kind", "granule_url", "parents", "height_change")
        cell = CellRequest.from_event(
            {
                **{k: v for k, v in event.items() if k not in own},
                "parent_morton": words[0],
                "granule_urls": [event.get("granule_url")],
            },
            entry,
        )
        problems = [
            f"parents[{i}] {word} {problem}"
            for i, word in enumerate(words)
            if (problem := cell_word_problem(word, cell.parent_order)) is not None
        ]
        if len(set(words)) != len(words):
            twice = next(w for w in words if words.count(w) > 1)
            problems.append(
                f"parents lists a morton word more than once ({twice}): one fragment each"
            )
        if problems:
            raise RequestError("; ".join(problems[:MAX_URL_PROBLEMS]))
        return cls(
            granule_url=cell.granule_urls[0],
            parents=words,
            store_path=cell.store_path,
            parent_order=cell.parent_order,
            child_order=cell.child_order,
            s3_credentials=cell.s3_credentials,
            config=cell.config,
            height_change=height_change,
        )

    def pipeline_config(self) -> PipelineConfig:
        """The request's config (built-in ``atl06`` by default) at the request's orders,
        without its ``height_change`` section unless :attr:`height_change` asks for it:
        what the extract reads and its fragments carry follow ``point_columns``."""
        config = load_config_at(self.config, self.parent_order, self.child_order)
        return config if self.height_change else replace(config, height_change=None)


@dataclass(frozen=True)
class ExtractResult:
    """What one extract did; ``reused`` when the store already held it for these inputs."""

    def as_found(self) -> ExtractResult:
        """This stored outcome as a run that found it reports it: nothing fetched now."""
        return replace(self, reused=True, bytes_fetched=0, bytes_written=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    url: str
    status: str
    points: int = 0
    parents: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    reason: str | None = None
    reused: bool = False


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
    (:func:`magg_core.fragments.fragments_intact`); a failure, for the same inputs.
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
