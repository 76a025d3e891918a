"""The pipeline config: what to read, how to aggregate it, where to write it.

A config is plain YAML (the built-in one is ``configs/atl06.yaml``). It is
validated once, on load, into frozen dataclasses so that every later stage
can trust it; each error names the offending key and value, because a user
editing YAML needs to know *where* the mistake is, not just that there is one.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from magg_core.errors import InputError
from magg_core.expressions import Expression, ExpressionError

BUILTIN_CONFIGS = ("atl06",)

STAT_FUNCTIONS = ("count", "min", "max", "mean", "sum", "variance", "quantile")
"""Reductions a statistic may use; ``mean`` takes optional ``weights``."""

TRANSFORM_VARIABLE = "x"
"""The name a statistic's ``transform`` expression uses for the reduced value."""


class ConfigError(InputError, ValueError):
    """A config that cannot be used; the message names the key and the value."""


@dataclass(frozen=True)
class QualityFilter:
    """Rows are kept only where ``dataset == accept``."""

    dataset: str
    accept: int


@dataclass(frozen=True)
class DataSource:
    """Where the points live inside one granule."""

    reader: str
    beams: tuple[str, ...]
    group: str
    """Per-beam group path; ``{beam}`` is replaced by each beam name."""
    latitude: str
    longitude: str
    variables: tuple[str, ...]
    fill_value: float
    quality: QualityFilter
    product: str | None = None
    """The ``short_name`` a granule must declare (its root attribute, as NSIDC writes
    it); ``None`` accepts any. A granule with no beam group at all is refused either
    way (:mod:`magg_core.granules.read`, "Wrong product")."""

    def beam_group(self, beam: str) -> str:
        return self.group.format(beam=beam)


@dataclass(frozen=True)
class Statistic:
    """One output array: a reduction of a column over the points of a child cell."""

    name: str
    function: str
    dtype: np.dtype
    fill_value: Any
    column: str | None = None
    weights: str | None = None
    q: float | None = None
    transform: Expression | None = None


@dataclass(frozen=True)
class Aggregation:
    columns: Mapping[str, Expression]
    """Derived per-point columns, evaluated in order (later ones may use earlier)."""
    coordinates: Mapping[str, np.dtype]
    statistics: tuple[Statistic, ...]


@dataclass(frozen=True)
class OutputSpec:
    grid: str
    indexing_scheme: str
    ellipsoid: str
    """The reference ellipsoid's name (e.g. ``WGS84``), checked at load against the
    named ellipsoids of healpix-geo, the library xdggs computes HEALPix geometry with."""
    parent_order: int
    child_order: int
    store: str | None = None
    """Default store URL; may contain ``{cycle}``."""
    levels: tuple[int, ...] = ()
    """Orders of the store's pyramid, ascending; ``()`` (the key absent) means
    ``child_order`` alone. Read :attr:`orders` rather than this."""

    @property
    def children_per_parent(self) -> int:
        return 4 ** (self.child_order - self.parent_order)

    @property
    def ellipsoid_parameters(self) -> dict[str, Any]:
        """``{name, semimajor_axis (m), inverse_flattening}`` of :attr:`ellipsoid`
        (``{name, radius (m)}`` for a sphere).

        The object form is what the zarr DGGS convention's ``dggs.ellipsoid``
        holds, and the only form both xdggs 0.6 and 0.7 decode (0.7 reads the
        bare name as a mapping and fails). Values from ``healpix_geo.ellipsoid``.
        """
        return named_ellipsoid(self.ellipsoid)

    @property
    def orders(self) -> tuple[int, ...]:
        """Every order with a group in the store, ascending; the last is ``child_order``."""
        return self.levels or (self.child_order,)

    def cells_per_parent(self, order: int) -> int:
        """Cells of ``order`` inside one parent cell: ``4**(order - parent_order)``."""
        return 4 ** (order - self.parent_order)


@dataclass(frozen=True)
class HeightChangeSource:
    """What the extract stage keeps besides the variables, for height change across cycles.

    With this section, each fragment also carries every point's ``latitude``
    and ``longitude`` (float64, degrees, from the coordinates the reader
    already holds) and ``time`` (the ``time`` dataset of the beam group, read
    at the point's row: ATL06 ``delta_time``, GPS seconds since 2018-01-01).
    """

    time: str
    """The per-point time dataset, e.g. ``delta_time``."""
    height: str
    """The variable fitted, e.g. ``h_li`` (metres)."""
    sigma: str
    """The variable holding each height's standard error (metres), e.g.
    ``h_li_sigma``: the fit weights a point by ``1 / sigma**2``."""


HEIGHT_CHANGE_COLUMNS = ("latitude", "longitude", "time")
"""The columns a fragment carries, besides the variables, when ``height_change`` is set."""


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    data_source: DataSource
    aggregation: Aggregation
    output: OutputSpec
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    """The validated mapping as loaded; the canonical form for hashing and events."""
    height_change: HeightChangeSource | None = None
    """Keep what a height-change fit needs in the fragments (``None``: only the variables)."""

    @property
    def point_columns(self) -> tuple[str, ...]:
        """The columns each point keeps in a fragment: the variables, then
        :data:`HEIGHT_CHANGE_COLUMNS` when the config has a ``height_change`` section."""
        extra = HEIGHT_CHANGE_COLUMNS if self.height_change is not None else ()
        return (*self.data_source.variables, *extra)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe copy that :func:`load_config` turns back into this config."""
        return json.loads(json.dumps(self.raw, allow_nan=False))

    @property
    def hash(self) -> str:
        """Content hash of the config: part of every cell's input fingerprint."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_orders(self, parent_order: int, child_order: int) -> PipelineConfig:
        """The same config at other HEALPix orders (as a cell request may ask).

        ``output.levels`` is dropped: it names orders of the original range, so
        the result has the group of its ``child_order`` only.
        """
        raw = self.to_dict()
        output = {k: v for k, v in raw["output"].items() if k != "levels"}
        raw["output"] = {**output, "parent_order": parent_order, "child_order": child_order}
        return load_config(raw)


def load_config_at(
    source: str | Path | Mapping[str, Any] | None, parent_order: int, child_order: int
) -> PipelineConfig:
    """:func:`load_config`, at the HEALPix orders a cell or extract request names."""
    config = load_config(source)
    if (config.output.parent_order, config.output.child_order) != (parent_order, child_order):
        config = config.with_orders(parent_order, child_order)
    return config


def load_config(source: str | Path | Mapping[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config.

    Parameters
    ----------
    source
        ``None`` or a built-in name (``"atl06"``) for a shipped config, a path
        to a YAML file, or an already-parsed mapping (as carried in a cell
        request).

    Raises
    ------
    ConfigError
        If the file is missing, larger than :data:`MAX_CONFIG_BYTES`, not UTF-8
        or not YAML, uses aliases, nests deeper than :data:`MAX_CONFIG_DEPTH`,
        or any key is missing or invalid. Errors in a file start with its name.
    """
    if isinstance(source, Mapping):
        return _parse(source)
    raw, where = _read_yaml(source)
    try:
        return _parse(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


MAX_CONFIG_BYTES = 1 << 20
"""A config is a few kilobytes (the built-in one: ~3 KB); reading stops past 1 MiB,
so pointing ``--config`` at a huge file (or ``/dev/zero``) is an error, not a hang."""
MAX_CONFIG_DEPTH = 32
"""Nesting a config needs is ~5 levels; PyYAML composes recursively and would
die of ``RecursionError`` on a document nested thousands deep."""


def _read_yaml(source: str | Path | None) -> tuple[Any, str]:
    """The parsed YAML of a built-in name or a file, and how to name it in errors."""
    if source is None or (isinstance(source, str) and source in BUILTIN_CONFIGS):
        name = source or "atl06"
        text = resources.files("magg_core.configs").joinpath(f"{name}.yaml").read_text()
        where = f"built-in config {name!r}"
    else:
        where = f"config file {str(source)!r}"
        text = _read_text(Path(source), where)
    try:
        raw = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping at the top level, got {type(raw).__name__}")
    return raw, where


def _read_text(path: Path, where: str) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}): not a config") from None


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and with bounded nesting.

    An alias repeats a node by reference, so a few lines of nested aliases
    ("billion laughs") expand into more objects than memory holds once the
    config is walked or copied; a config never needs one.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a config", mark
            )
        if self._depth >= MAX_CONFIG_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels", mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: where, then what."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return " ".join(str(exc).split())


class _Section:
    """Typed access to one mapping of the raw config, naming keys by full path."""

    def __init__(self, raw: Any, path: str):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {raw!r}")
        self.raw = raw
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if name not in self.raw:
            if default is ...:
                raise ConfigError(f"{self.key(name)}: required key is missing")
            return default
        value = self.raw[name]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"{self.key(name)}: expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.key(name)}: expected {_kind_name(kind)}, got {value!r}")
        return value

    def section(self, name: str) -> _Section:
        return _Section(self.get(name, Mapping), self.key(name))

    def reject_unknown(self, allowed: tuple[str, ...]) -> None:
        for name in self.raw:
            if name not in allowed:
                raise ConfigError(
                    f"{self.key(str(name))}: unknown key (allowed: {', '.join(allowed)})"
                )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(getattr(k, "__name__", str(k)) for k in kinds)


def _parse(raw: Mapping[str, Any]) -> PipelineConfig:
    top = _Section(raw, "")
    top.reject_unknown(("name", "data_source", "aggregation", "output", "height_change"))
    data_source = _parse_data_source(top.section("data_source"))
    aggregation = _parse_aggregation(top.section("aggregation"), data_source)
    output = _parse_output(top.section("output"))
    height_change = None
    if "height_change" in top.raw:
        height_change = _parse_height_change(top.section("height_change"), data_source)
    return PipelineConfig(
        name=top.get("name", str, "custom"),
        data_source=data_source,
        aggregation=aggregation,
        output=output,
        # A fresh copy: a caller mutating its mapping must not change our hash.
        raw=_jsonable(raw),
        height_change=height_change,
    )


def _parse_height_change(s: _Section, source: DataSource) -> HeightChangeSource:
    s.reject_unknown(("time", "height", "sigma"))
    fitted = {}
    for key in ("height", "sigma"):
        name = s.get(key, str)
        if name not in source.variables:
            raise ConfigError(
                f"{s.key(key)}: {name!r} is not one of data_source.variables "
                f"{list(source.variables)}"
            )
        fitted[key] = name
    time = s.get("time", str)
    if not time.isidentifier():
        raise ConfigError(f"{s.key('time')}: expected a dataset name, got {time!r}")
    clash = sorted(set(source.variables) & set(HEIGHT_CHANGE_COLUMNS))
    if clash:
        raise ConfigError(
            f"{s.key('time')}: data_source.variables {clash} would clash with the columns "
            f"height change adds to fragments ({', '.join(HEIGHT_CHANGE_COLUMNS)})"
        )
    reserved = {source.latitude, source.longitude, source.quality.dataset, *source.variables}
    if time in reserved:
        raise ConfigError(f"{s.key('time')}: {time!r} is already read as another column")
    return HeightChangeSource(time=time, **fitted)


def _parse_data_source(s: _Section) -> DataSource:
    s.reject_unknown(
        (
            "reader",
            "product",
            "beams",
            "group",
            "latitude",
            "longitude",
            "variables",
            "fill_value",
            "quality",
        )
    )
    product = s.get("product", str, None)
    if product is not None and not (product.isascii() and product.isalnum()):
        raise ConfigError(
            f"{s.key('product')}: expected a short name such as ATL06, got {product!r}"
        )
    reader = s.get("reader", str)
    if reader != "h5coro":
        raise ConfigError(f"{s.key('reader')}: unsupported reader {reader!r} (supported: h5coro)")
    beams = s.get("beams", list)
    if not beams or not all(isinstance(b, str) and b for b in beams):
        raise ConfigError(f"{s.key('beams')}: expected a non-empty list of names, got {beams!r}")
    group = s.get("group", str)
    try:  # a plain {beam}: no attributes, indexes, conversions or format specs
        fields = [parsed[1:] for parsed in string.Formatter().parse(group) if parsed[1] is not None]
    except ValueError:  # unbalanced braces
        fields = None
    if fields is None or any(f != ("beam", "", None) for f in fields):
        raise ConfigError(f"{s.key('group')}: only '{{beam}}' may be templated, got {group!r}")
    variables = s.get("variables", list)
    if not variables or not all(isinstance(v, str) and v.isidentifier() for v in variables):
        raise ConfigError(
            f"{s.key('variables')}: expected a non-empty list of dataset names "
            f"that are identifiers, got {variables!r}"
        )
    fill_value = float(_number(s.key("fill_value"), s.get("fill_value", (int, float, str))))
    q = s.section("quality")
    q.reject_unknown(("dataset", "accept"))
    quality = QualityFilter(dataset=q.get("dataset", str), accept=q.get("accept", int))
    return DataSource(
        reader=reader,
        beams=tuple(beams),
        group=group,
        latitude=s.get("latitude", str),
        longitude=s.get("longitude", str),
        variables=tuple(variables),
        fill_value=fill_value,
        quality=quality,
        product=product,
    )


def _parse_aggregation(s: _Section, source: DataSource) -> Aggregation:
    s.reject_unknown(("columns", "coordinates", "statistics"))
    known = set(source.variables)
    columns: dict[str, Expression] = {}
    cols = s.section("columns") if "columns" in s.raw else _Section({}, s.key("columns"))
    for name, text in cols.raw.items():
        key = cols.key(str(name))
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key}: column name must be an identifier, got {name!r}")
        if not isinstance(text, str):
            raise ConfigError(f"{key}: expected an expression string, got {text!r}")
        expr = _parse_expression(key, text)
        unknown = sorted(set(expr.names) - known)
        if unknown:
            raise ConfigError(
                f"{key}: expression {text!r} uses unknown column(s) {unknown} "
                f"(available: {sorted(known)})"
            )
        columns[name] = expr
        known.add(name)

    coords = s.section("coordinates")
    coordinates: dict[str, np.dtype] = {}
    for name in ("cell_ids", "morton"):
        dtype = _parse_dtype(coords.key(name), coords.get(name, str))
        if dtype != np.dtype("uint64"):
            raise ConfigError(
                f"{coords.key(name)}: must be uint64 (morton words and order-12 ids "
                f"exceed int64's safe range for southern cells), got {dtype}"
            )
        coordinates[name] = dtype

    stats_section = s.section("statistics")
    if not stats_section.raw:
        raise ConfigError(f"{stats_section.key('')[:-1]}: at least one statistic is required")
    statistics = tuple(
        _parse_statistic(stats_section.key(str(name)), name, spec, known)
        for name, spec in stats_section.raw.items()
    )
    return Aggregation(columns=columns, coordinates=coordinates, statistics=statistics)


def _parse_statistic(path: str, name: Any, spec: Any, known: set[str]) -> Statistic:
    if not isinstance(name, str) or not name.isidentifier() or name in ("cell_ids", "morton"):
        raise ConfigError(f"{path}: statistic name must be an identifier other than a coordinate")
    s = _Section(spec, path)
    s.reject_unknown(("function", "column", "weights", "q", "transform", "dtype", "fill_value"))
    function = s.get("function", str)
    if function not in STAT_FUNCTIONS:
        raise ConfigError(
            f"{s.key('function')}: unknown function {function!r} "
            f"(known: {', '.join(STAT_FUNCTIONS)})"
        )
    column = s.get("column", str, None)
    if function != "count" and column is None:
        raise ConfigError(f"{s.key('column')}: required for function {function!r}")
    for key, value in (("column", column), ("weights", s.get("weights", str, None))):
        if value is not None and value not in known:
            raise ConfigError(
                f"{s.key(key)}: unknown column {value!r} (available: {sorted(known)})"
            )
    weights = s.get("weights", str, None)
    if weights is not None and function != "mean":
        raise ConfigError(f"{s.key('weights')}: only function 'mean' takes weights")
    q = s.get("q", (int, float), None)
    if function == "quantile":
        if q is None or not 0.0 <= float(q) <= 1.0:
            raise ConfigError(f"{s.key('q')}: quantile needs q in [0, 1], got {q!r}")
        q = float(q)
    elif q is not None:
        raise ConfigError(f"{s.key('q')}: only function 'quantile' takes q")
    transform = None
    if "transform" in s.raw:
        text = s.get("transform", str)
        transform = _parse_expression(s.key("transform"), text)
        extra = sorted(set(transform.names) - {TRANSFORM_VARIABLE})
        if extra:
            raise ConfigError(
                f"{s.key('transform')}: may only use {TRANSFORM_VARIABLE!r}, got {text!r}"
            )
    dtype = _parse_dtype(s.key("dtype"), s.get("dtype", str))
    fill_value = _parse_fill(s.key("fill_value"), s.get("fill_value", (int, float, str)), dtype)
    return Statistic(
        name=name,
        function=function,
        dtype=dtype,
        fill_value=fill_value,
        column=column,
        weights=weights,
        q=q,
        transform=transform,
    )


def _parse_output(s: _Section) -> OutputSpec:
    s.reject_unknown(
        ("grid", "indexing_scheme", "ellipsoid", "parent_order", "child_order", "store", "levels")
    )
    grid = s.get("grid", str)
    if grid != "healpix":
        raise ConfigError(f"{s.key('grid')}: unsupported grid {grid!r} (supported: healpix)")
    scheme = s.get("indexing_scheme", str)
    if scheme != "nested":
        raise ConfigError(
            f"{s.key('indexing_scheme')}: unsupported scheme {scheme!r} (supported: nested)"
        )
    parent_order = s.get("parent_order", int)
    child_order = s.get("child_order", int)
    if not 0 <= parent_order < child_order <= 29:
        raise ConfigError(
            f"{s.key('child_order')}: need 0 <= parent_order < child_order <= 29, "
            f"got parent_order={parent_order!r}, child_order={child_order!r}"
        )
    return OutputSpec(
        grid=grid,
        indexing_scheme=scheme,
        ellipsoid=_parse_ellipsoid(s),
        parent_order=parent_order,
        child_order=child_order,
        store=s.get("store", str, None),
        levels=_parse_levels(s, parent_order, child_order),
    )


def named_ellipsoid(name: str) -> dict[str, Any]:
    """The ellipsoid called ``name`` as the zarr DGGS convention writes it.

    ``{"name", "semimajor_axis" (m), "inverse_flattening"}``, or ``{"name",
    "radius" (m)}`` for a sphere; values from healpix-geo's table of named
    ellipsoids (``healpix_geo.ellipsoid.resolve``). Raises ValueError if unknown.
    """
    from healpix_geo.ellipsoid import resolve

    parameters = resolve(name)  # a mapping whose key order varies from call to call
    keys = [k for k in ("semimajor_axis", "inverse_flattening", "radius") if k in parameters]
    return {"name": name, **{k: float(parameters[k]) for k in keys}}


def _parse_ellipsoid(s: _Section) -> str:
    """``output.ellipsoid``: the name of an ellipsoid healpix-geo knows (default ``WGS84``)."""
    name = s.get("ellipsoid", str, "WGS84")
    try:
        named_ellipsoid(name)
    except ValueError:
        raise ConfigError(
            f"{s.key('ellipsoid')}: unknown ellipsoid {name!r} (a name such as WGS84 or GRS80)"
        ) from None
    return name


def _parse_levels(s: _Section, parent_order: int, child_order: int) -> tuple[int, ...]:
    """``output.levels``: the orders of the store's pyramid, sorted; ``()`` when absent.

    Each level is a group of its own with the statistics computed from the
    points at that order, so it must lie between the parent order (one cell
    per parent) and the child order (the finest the cells compute), and the
    child order itself must be one of them (it is the group the cells' records
    and the template belong to).
    """
    if "levels" not in s.raw:
        return ()
    key = s.key("levels")
    levels = s.get("levels", list)
    if not levels or not all(isinstance(k, int) and not isinstance(k, bool) for k in levels):
        raise ConfigError(f"{key}: expected a non-empty list of integer orders, got {levels!r}")
    if len(set(levels)) != len(levels):
        raise ConfigError(f"{key}: orders must be unique, got {levels!r}")
    outside = [k for k in levels if not parent_order <= k <= child_order]
    if outside:
        raise ConfigError(
            f"{key}: orders must lie in parent_order..child_order "
            f"({parent_order}..{child_order}), got {outside}"
        )
    if child_order not in levels:
        raise ConfigError(f"{key}: must include child_order {child_order}, got {levels!r}")
    return tuple(sorted(levels))


def _parse_expression(key: str, text: str) -> Expression:
    try:
        return Expression.parse(text)
    except ExpressionError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def _parse_dtype(key: str, text: str) -> np.dtype:
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: unknown dtype {text!r}") from exc
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        # Zarr v3 has no float128/longdouble: fail here, not when writing.
        raise ConfigError(
            f"{key}: dtype must be an integer or float type of at most 64 bits, got {text!r}"
        )
    return dtype


def _number(key: str, value: int | float | str) -> int | float:
    """A YAML/JSON number, or one of the non-finite floats spelled as a string."""
    if isinstance(value, str):
        if value.lower() not in ("nan", "inf", "-inf"):
            raise ConfigError(f"{key}: expected a number, 'nan', 'inf' or '-inf', got {value!r}")
        return float(value)
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError as exc:
            raise ConfigError(f"{key}: number {value!r} is too large") from exc
    return value


def _parse_fill(key: str, value: Any, dtype: np.dtype) -> Any:
    value = _number(key, value)
    if dtype.kind in "iu":
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: integer dtype {dtype} needs an integer fill, got {value!r}")
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ConfigError(f"{key}: fill {value!r} does not fit dtype {dtype}")
        return dtype.type(int(value))
    with np.errstate(over="ignore"):
        fill = dtype.type(value)
    if np.isinf(fill) and not math.isinf(value):
        raise ConfigError(f"{key}: fill {value!r} does not fit dtype {dtype}")
    return fill


def _jsonable(value: Any) -> Any:
    """A deep copy in plain JSON types.

    Non-finite numbers become ``"nan"``/``"inf"``/``"-inf"`` (which the loader
    accepts) because strict JSON encoders -- Prefect's among them -- would
    otherwise turn them into ``null`` or fail.
    """
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    return value
