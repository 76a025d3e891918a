"""One parent cell of the height-change product: its fragments in every cycle → fit → write.

The height-change store has the layout of a cycle store (:mod:`magg_core.store.arrays`:
group ``/{child_order}/``, one chunk per parent, DGGS attributes, a record per
parent) with the arrays of :data:`magg_core.height_change.dhdt.FIT_ARRAYS` instead of the
statistics. Each parent is fitted from the fragments the cycles' extract
stage kept (``magg run --keep-fragments`` with a config that has a
``height_change`` section): every point's child, height, latitude, longitude
and time, so no granule is read again.

A parent is ``failed`` -- nothing written, a record naming each cycle and
granule whose fragment is missing, and why -- when any cycle lacks one of its
fragments: a fit over the remaining cycles would silently change the trend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime

import mortie
import numpy as np

import magg_core
from magg_core.access.s3 import S3Endpoint
from magg_core.config import PipelineConfig, load_config
from magg_core.height_change.dhdt import FIT_ARRAYS, cell_offsets, fit_height_change, years_since
from magg_core.morton import children
from magg_core.schema import (
    CellResult,
    CycleFragments,
    FitOptions,
    GranuleFailure,
    GranulePoints,
    HeightChangeRequest,
)
from magg_core.store.arrays import ArraySpec, check_template, open_store, write_cell
from magg_core.store.fragments import read_cell_fragments
from magg_core.store.work import UnitOfWork, record_result


def fit_arrays(epoch: datetime) -> tuple[ArraySpec, ...]:
    """The arrays of a height-change store (:data:`.dhdt.FIT_ARRAYS`), with units.

    ``reference_epoch`` (ISO 8601 UTC, the ``t0`` of ``t = 0``) is an attribute of
    each array, so ``h0`` says which instant it is the height at.
    """
    return tuple(
        ArraySpec(
            name,
            np.dtype(dtype),
            np.dtype(dtype).type(fill),
            {"units": units, "long_name": long_name, "reference_epoch": epoch.isoformat()},
        )
        for name, dtype, fill, units, long_name in FIT_ARRAYS
    )


def height_change_fingerprint(request: HeightChangeRequest) -> str:
    """A hash of everything a parent's fit depends on (the task's cache key and its record).

    The cycle stores and, per cycle, the set of granule names; the config
    hash; the fit options; the reference epoch; the magg version.
    """
    material = {
        "cycles": [
            {"cycle": c.cycle, "store": c.store_path, "granules": sorted(c.granules)}
            for c in sorted(request.cycles, key=lambda c: c.cycle)
        ],
        "config": load_config(request.config).hash,
        "options": asdict(request.options),
        "epoch": request.epoch.isoformat(),
        "magg": magg_core.__version__,
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def process_height_change(
    request: HeightChangeRequest,
    *,
    endpoint: S3Endpoint | None = None,
    deadline: float | None = None,
) -> CellResult:
    """Fit one parent's children from every cycle's fragments, write its chunk and record.

    Parameters
    ----------
    request
        The parent, its chunk in the output store, and per cycle the store and
        granules whose fragments feed it.
    endpoint
        Where ``s3://`` stores live (default: from the environment).
    deadline
        A ``time.monotonic()`` instant after which the parent gives up before
        writing (:class:`~magg_core.errors.CellTimeoutError`), as
        :func:`magg_core.grid.cell.process_cell` does.

    Returns
    -------
    CellResult
        ``ok`` (some child fitted), ``empty`` (no child had enough points and
        cycles) or ``failed``: a fragment is missing; ``files_failed`` names
        ``cycle N: granule`` and why, and nothing is written.

    Raises
    ------
    magg_core.store.arrays.TemplateMismatchError
        If the output store's template does not hold this parent at ``chunk_idx``.
    ValueError
        If a fragment lacks a column of the config (``h_li``, ``latitude``,
        ``longitude``, ``time``).
    """
    work = UnitOfWork(request.parent_morton, deadline)
    endpoint = endpoint or S3Endpoint.from_env()
    config = request.pipeline_config()
    output = open_store(request.store_path, endpoint=endpoint)
    template = check_template(output, config, request.parent_morton, request.chunk_idx)
    result = CellResult(
        parent_morton=request.parent_morton,
        status="empty",
        granule_count=request.granule_count,
    )

    with work.timed("read"):
        points, failures = _read_cycles(request, config, endpoint)
    result.files_processed = sum(len(p) for p in points.values())
    result.files_failed = failures
    outputs: dict[str, str | None] = {}
    if failures:
        result.status = "failed"
        result.error = (
            f"{len(failures)} of {request.granule_count} fragments missing; "
            "nothing written (re-run the cycles' extracts with --keep-fragments)"
        )
    else:
        with work.timed("aggregate"):
            fit = fit_parent(request.parent_morton, points, config, request.options, request.epoch)
        result.total_obs = int(fit["n_points"].sum())
        result.cells_with_data = int(np.count_nonzero(fit["n_points"]))
        result.status = "ok" if result.cells_with_data else "empty"
        work.check_deadline()
        with work.timed("write"):
            arrays = fit_arrays(request.epoch)
            # what the record proves (records.proven_cells)
            outputs = write_cell(
                output, config, request.chunk_idx, fit, arrays=arrays, template=template
            )
    record_height_change(request, work.finish(result), endpoint=endpoint, outputs=outputs)
    return result


def record_height_change(
    request: HeightChangeRequest,
    result: CellResult,
    *,
    endpoint: S3Endpoint | None = None,
    outputs: Mapping[str, str | None] | None = None,
) -> None:
    """Store the parent's record (its result, input fingerprint and the digests of the
    chunks it wrote, ``outputs``) in the output store."""
    config = request.pipeline_config()
    output = open_store(request.store_path, endpoint=endpoint or S3Endpoint.from_env())
    record_result(output, config, result, height_change_fingerprint(request), outputs)


def fit_parent(
    parent_morton: int,
    points: Mapping[int, Sequence[GranulePoints]],
    config: PipelineConfig,
    options: FitOptions,
    epoch: datetime,
) -> dict[str, np.ndarray]:
    """Fit every child of one parent from its points in each cycle.

    Parameters
    ----------
    parent_morton
        The parent (uint64 morton word at ``config.output.parent_order``).
    points
        Cycle → that cycle's fragments of the parent (columns ``h_li``,
        ``h_li_sigma``, ``latitude``, ``longitude``, ``time``). Points whose
        ``h_li_sigma`` is not finite and positive are left out.
    config, options, epoch
        The orders; the fit's minimums and rejection rule; ``t0``.

    Returns
    -------
    dict
        :data:`.dhdt.FIT_ARRAYS` name → array of shape ``(children_per_parent,)``.

    Notes
    -----
    ``x, y`` are metres about each child's centre on the hemisphere's polar
    stereographic map (:func:`magg_core.height_change.dhdt.cell_offsets`); the centre is
    the HEALPix cell's centre (mortie's ``mort2geo``, geodetic degrees) and
    ``t`` is Julian years since ``epoch`` (:func:`magg_core.height_change.dhdt.years_since`).
    """
    n_children = config.output.children_per_parent
    parts = [(cycle, p) for cycle, fragments in points.items() for p in fragments]
    child = np.concatenate([p.child_index for _, p in parts] or [np.empty(0, np.int64)])
    labels = np.concatenate(
        [np.full(len(p), cycle, dtype=np.int64) for cycle, p in parts] or [np.empty(0, np.int64)]
    )

    def column(name: str) -> np.ndarray:
        values = [np.asarray(p.columns[name], dtype=np.float64) for _, p in parts]
        return np.concatenate(values or [np.empty(0)])

    # A sigma that is zero, negative or not finite describes no measurement and gives
    # no weight (as for the cycle statistics, magg_core.stats.aggregate.valid_points).
    source = config.height_change
    if source is None:
        raise ValueError(f"config {config.name!r} has no height_change section")
    sigma = column(source.sigma)
    good = np.isfinite(sigma) & (sigma > 0)
    child, labels, sigma = child[good], labels[good], sigma[good]
    lat, lon = column("latitude")[good], column("longitude")[good]
    centre_lat, centre_lon = child_centres(parent_morton, config)
    x, y = cell_offsets(lat, lon, centre_lat[child], centre_lon[child])
    t = years_since(column("time")[good], epoch)
    h = column(source.height)[good]
    return fit_height_change(child, x, y, t, h, labels, n_children, options, h_sigma=sigma)


def child_centres(parent_morton: int, config: PipelineConfig) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (geodetic degrees) of each child's centre, in child order."""
    words = children(int(parent_morton), config.output.child_order)
    lat, lon = mortie.mort2geo(words)
    return np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)


def _read_cycles(
    request: HeightChangeRequest, config: PipelineConfig, endpoint: S3Endpoint
) -> tuple[dict[int, list[GranulePoints]], list[GranuleFailure]]:
    """Every cycle's fragments of the parent, the cycles read concurrently.

    A missing fragment is a failure named ``cycle N: granule``.
    """

    def one(cycle: CycleFragments) -> tuple[list[GranulePoints], list[GranuleFailure]]:
        store = open_store(cycle.store_path, endpoint=endpoint, read_only=True)
        points, failures = read_cell_fragments(
            store, config, cycle.granules, request.parent_morton, config.point_columns
        )
        named = [
            GranuleFailure(url=f"cycle {cycle.cycle}: {f.url}", reason=f.reason) for f in failures
        ]
        return points, named

    with ThreadPoolExecutor(max_workers=max(1, len(request.cycles))) as pool:
        outcomes = list(pool.map(one, request.cycles))
    points = {c.cycle: o[0] for c, o in zip(request.cycles, outcomes, strict=True)}
    failures = [f for _, failed in outcomes for f in failed]
    return points, failures
