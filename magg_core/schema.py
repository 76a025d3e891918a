"""The one request/result schema shared by threads, the Lambda handler and ECS runs.

The request keeps the seed's Lambda event field-for-field (``parent_morton``,
``parent_order``, ``child_order``, ``granule_urls``, ``store_path``,
``s3_credentials``) so existing orchestrators keep working; ``chunk_idx`` and
``config`` are additions. The result is what every backend reports per cell.

Everything else that passes between stages, processes and backends lives here
too, one name per concept: the extract stage's request and result, a
granule's points in a parent (:class:`GranulePoints`, the reader's output
and a fragment's content), and the height-change product's request and fit
options. Stages import these types from here, never from each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, Literal
from urllib.parse import unquote

import numpy as np

from magg_core.access.s3 import S3Credentials
from magg_core.config import ConfigError, PipelineConfig, load_config, load_config_at
from magg_core.cycles import granule_fields
from magg_core.errors import InputError
from magg_core.morton import cell_word_problem
from magg_core.urls import (
    ALLOWED_STORES_VARIABLE,
    URLError,
    granule_name,
    granule_url,
    remote_store,
)

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
apply when a granule is read (:mod:`magg_core.granules.read`), the third when the cell
aggregates (:func:`magg_core.stats.aggregate.valid_points`)."""

READ_DROPS = DROP_REASONS[:2]
"""The reasons the reader leaves a point inside a parent out: ``quality`` and
``fill`` (see :data:`DROP_REASONS`)."""


@dataclass(frozen=True)
class GranulePoints:
    """The good points of one granule inside one parent cell.

    ``child_index`` (int64) is each point's child position in the parent,
    ``0 .. 4**(child_order - parent_order) - 1``; ``columns`` holds the
    config's variables, aligned with it, in the file's dtypes.
    """

    url: str
    child_index: np.ndarray
    columns: Mapping[str, np.ndarray] = field(repr=False)
    dropped: Mapping[str, int] = field(default_factory=dict)
    """Points of the granule inside the parent that the reader did not keep, by
    reason (:data:`READ_DROPS`; see :func:`magg_core.granules.read.read_parents`)."""
    bytes_fetched: int = 0
    """Bytes the driver read, metadata included (for the read-efficiency target,
    docs/architecture.md §Targets)."""
    requests: int = 0

    def __len__(self) -> int:
        return int(self.child_index.size)


REQUIRED_FIELDS = ("parent_morton", "parent_order", "child_order", "granule_urls", "store_path")


class RequestError(InputError, ValueError):
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
    (:mod:`magg_core.store.fragments`) instead of reading the granules here."""
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
    def from_event(cls, event: Mapping[str, Any], entry: EntryPoint) -> CellRequest:
        """Parse and validate an event sent to ``entry``; every problem is named in one error.

        The JSON shape is checked here (integers, lists, flags, credentials),
        then :func:`check_request` applies what every entry point checks.

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
            urls = ()
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
        if problems:  # with the URLs' problems too, so one answer names them all
            raise RequestError("; ".join(problems + _granule_urls(urls)[1]))
        request = cls(
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
        return check_request(request, entry)

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


@dataclass(frozen=True)
class EntryPoint:
    """Who hands work to a cell or an extract, which decides what its request may name.

    A *remote* entry point takes events written by whoever may invoke the
    Lambda function or create a flow run of a deployment: its granules must
    be S3 objects (a local path or ``file://`` URL would let a caller read
    the worker's own files, and see their first bytes in a failure reason),
    and its store an ``s3://`` URL the operator allows
    (:func:`magg_core.urls.remote_store`). The operator's own entry point (the
    CLI and ``process-cycle``, through :func:`magg_core.grid.plan.plan_cells`)
    may also read the operator's mirror and write a local store.
    """

    remote: bool
    allow_list_required: bool = False
    """Remote only: whether an unset :data:`~magg_core.urls.ALLOWED_STORES_VARIABLE`
    refuses every store (see :func:`magg_core.urls.remote_store`)."""


LAMBDA = EntryPoint(remote=True, allow_list_required=True)
"""The Lambda function (cell and extract events): writes only below ``MAGG_ALLOWED_STORES``."""
ECS = EntryPoint(remote=True)
"""The ``process-cell`` and ``extract-granule`` flows: ``s3://`` stores only, below
``MAGG_ALLOWED_STORES`` when the container sets it (else its task role decides)."""
OPERATOR = EntryPoint(remote=False)
"""``process-cycle`` (the CLI, a deployment run): the plan built the request from a checked
catalog and the operator's own store and mirror."""


def check_request(
    request: CellRequest, entry: EntryPoint, config: PipelineConfig | None = None
) -> CellRequest:
    """The one validation of a cell request, whichever entry point it came through.

    Checks, naming every problem in one error:

    - the config loads at the request's orders (``config``, when the caller
      already loaded it at those orders, is used as is);
    - ``parent_morton`` is a canonical morton word of ``parent_order``
      (mortie decides: :func:`magg_core.morton.cell_word_problem`), so it can
      only ever match its own chunk;
    - the granules are canonical (remote: ``s3://`` objects, NSIDC's HTTPS
      form mapped to them, :func:`magg_core.urls.granule_url`) and name each
      acquisition once (:func:`duplicate_granule`, also what constructing a
      request checks);
    - a remote request's store is one its entry point may write.

    Returns
    -------
    CellRequest
        ``request`` with canonical granule URLs and store URL.

    Raises
    ------
    RequestError
        Naming each bad field (a bad config or order is reported as ``config: …``).
    """
    problems = []
    try:
        config = config or load_config_at(request.config, request.parent_order, request.child_order)
    except ConfigError as exc:
        problems.append(f"config: {exc}")
    else:
        problem = cell_word_problem(request.parent_morton, config.output.parent_order)
        if problem is not None:
            problems.append(f"parent_morton {request.parent_morton} {problem}")
    urls = list(request.granule_urls)
    if entry.remote:
        urls, url_problems = _granule_urls(urls)
        problems += url_problems
    duplicate = duplicate_granule(urls)
    if duplicate is not None:
        problems.append(duplicate)
    store = request.store_path
    if entry.remote:
        try:
            store = remote_store(
                store, os.environ.get(ALLOWED_STORES_VARIABLE), required=entry.allow_list_required
            )
        except URLError as exc:
            problems.append(str(exc))
    if problems:
        raise RequestError("; ".join(problems))
    return replace(request, granule_urls=tuple(urls), store_path=store)


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

    A URL that names no file is no one's duplicate: the URL checks report it
    with its position (:func:`check_request`).
    """
    seen: dict[Any, tuple[int, str]] = {}
    for i, url in enumerate(urls):
        try:
            name = granule_name(url)
        except URLError:
            continue
        if url[:5].lower() == "file:":
            name = unquote(name)
        parsed = granule_fields(name)
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

        The cell event's validation (:func:`magg_core.schema.check_request`)
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


# -- the height-change product ----------------------------------------------------------


@dataclass(frozen=True)
class FitOptions:
    """Minimums and the outlier-rejection rule of the height-change fit
    (:func:`magg_core.height_change.dhdt.fit_height_change`).

    Attributes
    ----------
    min_points
        Fewest kept points for a fit: 4 parameters plus enough residual
        degrees of freedom (6) for the MAD and ``s²`` to mean something.
    min_cycles
        Fewest distinct cycles: two cycles give a trend that is only a
        difference, with nothing in time to show a bad cycle; three is the
        least that leaves a temporal residual.
    rejection_threshold
        Points farther than this many robust sigmas from the fit are dropped.
        Not 3: the MAD of ~100 residuals is itself uncertain by ~10 %, and
        repeated rounds at 3 trim ~2 % of normal residuals, enough to shrink
        the SE measurably (module docstring); at 4 a normal residual is
        dropped 0.006 % of the time, while blunders of metres stand tens of
        sigmas off.
    max_iterations
        Most rounds of rejection.
    min_sigma
        Floor (m) of the robust sigma, so that near noise-free data (a MAD of
        ~0) does not reject good points; 1 cm is below ATL06's precision over
        flat ice, a few centimetres (Smith et al., 2019, Remote Sensing of
        Environment 233, 111352).
    min_rcond
        Smallest reciprocal condition number of the centred, km-scaled normal
        matrix for a child to be fitted.
    """

    min_points: int = 10
    min_cycles: int = 3
    rejection_threshold: float = 4.0
    max_iterations: int = 5
    min_sigma: float = 0.01
    min_rcond: float = 1e-10

    def __post_init__(self) -> None:
        if self.min_points < 5 or self.min_cycles < 2:
            raise ValueError(
                f"min_points must be >= 5 and min_cycles >= 2, "
                f"got {self.min_points} and {self.min_cycles}"
            )
        if self.rejection_threshold <= 0 or self.max_iterations < 0 or self.min_sigma < 0:
            raise ValueError(
                "rejection_threshold must be positive, max_iterations and min_sigma >= 0"
            )


@dataclass(frozen=True)
class CycleFragments:
    """Where one cycle's points for one parent are: its store and the granules with fragments."""

    cycle: int
    store_path: str
    granules: tuple[str, ...]
    """Granule file names whose fragment of the parent holds points (sorted)."""


@dataclass(frozen=True)
class HeightChangeRequest:
    """One parent of the height-change product.

    ``config`` is the cycles' pipeline config mapping (all cycles share it:
    :func:`magg_core.height_change.plan.plan_height_change` checks); it decides the
    orders and fragment layout, and is the output store's config too.
    """

    parent_morton: int
    chunk_idx: int
    cycles: tuple[CycleFragments, ...]
    store_path: str
    config: Mapping[str, Any]
    options: FitOptions
    epoch: datetime
    """The reference epoch ``t0`` (UTC) of the whole product."""

    def pipeline_config(self) -> PipelineConfig:
        return load_config(self.config)

    @property
    def granule_count(self) -> int:
        return sum(len(c.granules) for c in self.cycles)
