"""The one request/result schema shared by threads, the Lambda handler and ECS runs.

The request keeps the seed's Lambda event field-for-field (``parent_morton``,
``parent_order``, ``child_order``, ``granule_urls``, ``store_path``,
``s3_credentials``) so existing orchestrators keep working; ``chunk_idx`` and
``config`` are additions. The result is what every backend reports per cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

from magg_core.cycles import parse_granule_name
from magg_core.s3 import S3Credentials
from magg_core.urls import URLError, granule_url

CellStatus = Literal["ok", "empty", "no_granules", "partial", "failed"]
"""``partial``: some granules were read and some failed, so the cell's statistics
miss points; they are written only when the request accepts partial cells."""
INCOMPLETE_STATUSES = frozenset({"partial", "failed"})
"""Outcomes that are not a complete, correct cell: never cached, never silently accepted."""

DROP_REASONS = ("quality", "fill", "sigma")
"""Why a point of a cell's granules inside the cell is not in its statistics, in
the order the filters apply (a point counts under the first that drops it):
``quality``, its quality flag is not the config's accepted value; ``fill``, a
variable has no value (the fill value, a non-finite number, or a dataset
without rows in that beam); ``sigma``, an uncertainty (a read variable a
``weights`` column is derived from) is not finite and positive. The first two
apply when a granule is read (:mod:`magg_core.read`), the third when the cell
aggregates (:func:`magg_core.aggregate.valid_points`)."""

REQUIRED_FIELDS = ("parent_morton", "parent_order", "child_order", "granule_urls", "store_path")


class RequestError(ValueError):
    """A cell request that cannot be run; the message names the bad fields."""


@dataclass(frozen=True)
class CellRequest:
    parent_morton: int
    parent_order: int
    child_order: int
    granule_urls: tuple[str, ...]
    store_path: str
    chunk_idx: int | None = None
    """Position of the parent in the store; looked up from the store when ``None``."""
    s3_credentials: S3Credentials | None = None
    config: Mapping[str, Any] | None = None
    """A pipeline config mapping; ``None`` means the built-in ``atl06``."""
    from_fragments: bool = False
    """Aggregate the fragments the extract stage stored for this cell
    (:mod:`magg_core.fragments`) instead of reading the granules here."""
    accept_partial: bool = False
    """Write the statistics of a ``partial`` cell (some granules failed) instead of
    leaving its chunk as it was: for runs where a granule is known to be bad upstream."""

    def __post_init__(self) -> None:
        """Refuse a request that would grid one acquisition twice, whoever built it.

        A cell sums whatever it is given, so a granule listed twice -- the same
        URL, another spelling or bucket of the same file, or another revision
        or release of the same acquisition -- would double its points and
        shrink ``h_sigma`` by √2. Checked here, every channel is covered: a
        catalog's plan, a Lambda event, an ECS flow run's parameters.

        Raises
        ------
        RequestError
            Naming both positions in ``granule_urls`` and the granules.
        """
        problem = duplicate_granule(self.granule_urls)
        if problem is not None:
            raise RequestError(f"cell {self.parent_morton}: {problem}")

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> CellRequest:
        """Validate a Lambda-style event; every problem is named in one error.

        An event is untrusted, so its granules must be S3 objects
        (:func:`magg_core.urls.granule_url`: ``s3://bucket/key``, or NSIDC's
        ``https://`` form mapped to it); a local path or ``file://`` URL is
        refused before anything is read.

        Raises
        ------
        RequestError
            Naming each bad field; for a granule URL, its index and scheme.
        """
        if not isinstance(event, Mapping):
            raise RequestError(f"event must be a JSON object, got {type(event).__name__}")
        missing = [name for name in REQUIRED_FIELDS if name not in event]
        if missing:
            raise RequestError(f"missing required field(s): {', '.join(missing)}")
        problems = []
        ints = {}
        for name in ("parent_morton", "parent_order", "child_order", "chunk_idx"):
            value = event.get(name)
            if value is None and name == "chunk_idx":
                continue
            try:
                if isinstance(value, bool) or isinstance(value, float):
                    raise ValueError
                ints[name] = int(value)  # JSON catalogs carry uint64 words as strings
            except (TypeError, ValueError):
                problems.append(f"{name} must be an integer, got {value!r}")
        urls = event["granule_urls"]
        if not isinstance(urls, list | tuple) or not all(isinstance(u, str) for u in urls):
            problems.append("granule_urls must be a list of URL strings")
        else:
            urls, url_problems = _granule_urls(urls)
            problems += url_problems
        if not isinstance(event["store_path"], str) or not event["store_path"]:
            problems.append(f"store_path must be a non-empty string, got {event['store_path']!r}")
        credentials = None
        if event.get("s3_credentials") is not None:
            raw = event["s3_credentials"]
            try:
                if not isinstance(raw, Mapping):
                    raise ValueError("s3_credentials must be an object")
                credentials = S3Credentials.from_event(dict(raw))
            except ValueError as exc:
                problems.append(str(exc))  # names fields only, never values
        config = event.get("config")
        if config is not None and not isinstance(config, Mapping):
            problems.append("config must be an object")
        flags = {name: event.get(name, False) for name in ("accept_partial", "from_fragments")}
        for name, value in flags.items():
            if not isinstance(value, bool):
                problems.append(f"{name} must be true or false, got {value!r}")
        if problems:
            raise RequestError("; ".join(problems))
        if not 0 <= ints["parent_morton"] < 2**64:
            raise RequestError(f"parent_morton must be a uint64 word, got {ints['parent_morton']}")
        return cls(
            parent_morton=ints["parent_morton"],
            parent_order=ints["parent_order"],
            child_order=ints["child_order"],
            granule_urls=tuple(urls),
            store_path=event["store_path"],
            chunk_idx=ints.get("chunk_idx"),
            s3_credentials=credentials,
            config=config,
            **flags,
        )

    def to_event(self, *, include_credentials: bool = True) -> dict[str, Any]:
        """The JSON event form; carries secrets unless ``include_credentials=False``."""
        event: dict[str, Any] = {
            "parent_morton": self.parent_morton,
            "parent_order": self.parent_order,
            "child_order": self.child_order,
            "granule_urls": list(self.granule_urls),
            "store_path": self.store_path,
            "chunk_idx": self.chunk_idx,
        }
        if include_credentials and self.s3_credentials is not None:
            event["s3_credentials"] = self.s3_credentials.to_event()
        if self.config is not None:
            event["config"] = dict(self.config)
        for name in ("accept_partial", "from_fragments"):
            if getattr(self, name):
                event[name] = True
        return event


MAX_URL_PROBLEMS = 3


def _granule_urls(urls: Sequence[str]) -> tuple[list[str], list[str]]:
    """The canonical ``s3://`` URLs of an event's granules, and a problem per bad one.

    Only the first few problems are spelled out: an event of thousands of bad
    URLs must not produce a megabyte of error message.
    """
    canonical, problems = [], []
    for i, url in enumerate(urls):
        try:
            canonical.append(granule_url(url))
        except URLError as exc:
            problems.append(f"granule_urls[{i}]: {exc}")
    if len(problems) > MAX_URL_PROBLEMS:
        more = len(problems) - MAX_URL_PROBLEMS
        problems = [*problems[:MAX_URL_PROBLEMS], f"and {more} more bad granule URL(s)"]
    return canonical, problems


def duplicate_granule(urls: Sequence[str]) -> str | None:
    """Why ``urls`` name one acquisition twice, or ``None`` if each is named once.

    Two URLs are the same granule when their file names are equal (what
    magg's fragments and fingerprints key by: a mirror or another bucket holds
    the same file), and the same acquisition when their names differ only in
    revision or release (:attr:`magg_core.cycles.GranuleName.acquisition`). A
    ``file://`` URL's name is compared percent-decoded, as it is read; an
    ``s3://`` key is literal (S3 does not decode it), and two spellings of one
    key (``s3://b//k``) are one URL once canonical (:func:`granule_url`).
    """
    seen: dict[Any, tuple[int, str]] = {}
    for i, url in enumerate(urls):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if url[:5].lower() == "file:":
            name = unquote(name)
        parsed = parse_granule_name(name)
        for key in (name, parsed.acquisition if parsed is not None else None):
            if key is None or key not in seen:
                continue
            first, other = seen[key]
            if other == name:
                return f"granule_urls[{i}] is granule {name!r} again (granule_urls[{first}])"
            return (
                f"granule_urls[{i}] ({name!r}) and granule_urls[{first}] ({other!r}) are two "
                "revisions or releases of one acquisition: a cell grids each acquisition once"
            )
        seen[name] = (i, name)
        if parsed is not None:
            seen[parsed.acquisition] = (i, name)
    return None


@dataclass(frozen=True)
class GranuleFailure:
    url: str
    reason: str


@dataclass
class Timings:
    read: float = 0.0
    aggregate: float = 0.0
    write: float = 0.0
    total: float = 0.0


@dataclass
class CellResult:
    parent_morton: int
    status: CellStatus
    cells_with_data: int = 0
    total_obs: int = 0
    granule_count: int = 0
    files_processed: int = 0
    files_failed: list[GranuleFailure] = field(default_factory=list)
    duration_s: Timings = field(default_factory=Timings)
    peak_rss_mb: float = 0.0
    error: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    """Points of the read granules inside the cell left out of the statistics, by
    :data:`DROP_REASONS`. ``total_obs`` plus these is every point the read
    granules hold in the cell."""

    @property
    def is_complete(self) -> bool:
        """Every granule read (or none to read): the statistics hold every good point."""
        return self.status not in INCOMPLETE_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; ``parent_morton`` is a string since JSON numbers lose uint64."""
        data = asdict(self)
        data["parent_morton"] = str(self.parent_morton)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellResult:
        return cls(
            parent_morton=int(data["parent_morton"]),
            status=data["status"],
            cells_with_data=int(data.get("cells_with_data", 0)),
            total_obs=int(data.get("total_obs", 0)),
            granule_count=int(data.get("granule_count", 0)),
            files_processed=int(data.get("files_processed", 0)),
            files_failed=[GranuleFailure(**f) for f in data.get("files_failed", [])],
            duration_s=Timings(**data.get("duration_s", {})),
            peak_rss_mb=float(data.get("peak_rss_mb", 0.0)),
            error=data.get("error"),
            dropped={str(k): int(v) for k, v in (data.get("dropped") or {}).items()},
        )
