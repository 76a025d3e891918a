"""Plan the height-change product: which cycle stores, which parents, which fragments each.

For each requested cycle the plan opens its store and checks that it was
gridded with this config (same config hash, so the same orders and the same
fragment columns) and that its fragments were kept. What feeds each parent
comes from the cycle's *extract records* (``fragments/{order}/*/extract.json``,
:mod:`magg_core.store.fragments`): one listing and one small GET per granule, each
record naming the parents its granule has points in. The cycle's cell records
cannot say this (they count granules, not name them), but they do say which
parents were incomplete in that cycle: their failed granules are added to the
parent's list, so its fit fails naming them rather than fitting fewer cycles.

The parents are the union over the cycles (ascending morton, the chunk
order), and the reference epoch ``t0`` is fixed by the cycles alone:
the middle of the first cycle's nominal start and the last cycle's nominal
end (:func:`magg_core.cycles.cycle_range`), so every parent of a product, and
a re-run, uses the same ``t0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import zarr

from magg_core.access.s3 import S3Endpoint
from magg_core.config import PipelineConfig
from magg_core.cycles import cycle_range, granule_fields
from magg_core.errors import InputError
from magg_core.schema import INCOMPLETE_STATUSES, CycleFragments, FitOptions, HeightChangeRequest
from magg_core.store.arrays import TEMPLATE_ATTR, open_store, read_template
from magg_core.store.fragments import granule_name, read_extract_records
from magg_core.store.records import read_records


class HeightChangePlanError(InputError, ValueError):
    """The cycle stores cannot make a height-change product; the message names the store."""


@dataclass(frozen=True)
class CycleStore:
    """What one cycle's store offers the product."""

    cycle: int
    store_path: str
    granules: Mapping[int, tuple[str, ...]]
    """Parent morton word → names of the granules with points in it (sorted)."""
    fragments: int
    """Granules whose extract succeeded (each with its fragments)."""


@dataclass(frozen=True)
class HeightChangePlan:
    config: PipelineConfig
    epoch: datetime
    cycles: tuple[CycleStore, ...]
    parents: np.ndarray
    """Parent morton words (uint64), ascending: the output's chunk order."""

    def requests(
        self, store_path: str, options: FitOptions, cells: Sequence[str] | None = None
    ) -> list[HeightChangeRequest]:
        """One request per parent (or per parent of ``cells``, morton words as strings).

        Raises
        ------
        HeightChangePlanError
            If a requested cell is not a parent of any cycle.
        """
        index = {int(p): i for i, p in enumerate(self.parents.tolist())}
        wanted = list(index) if cells is None else [int(c) for c in cells]
        unknown = [c for c in wanted if c not in index]
        if unknown:
            raise HeightChangePlanError(
                f"cells {unknown[:5]} have no points in any of cycles "
                f"{[c.cycle for c in self.cycles]}"
            )
        return [
            HeightChangeRequest(
                parent_morton=parent,
                chunk_idx=index[parent],
                cycles=tuple(
                    CycleFragments(c.cycle, c.store_path, c.granules.get(parent, ()))
                    for c in self.cycles
                ),
                store_path=store_path,
                config=self.config.to_dict(),
                options=options,
                epoch=self.epoch,
            )
            for parent in sorted(wanted)
        ]

    def provenance(self, options: FitOptions) -> dict[str, Any]:
        """What the output store's template records: cycles, stores, fragments, t0, options."""
        return {
            "product": "height_change",
            "reference_epoch": self.epoch.isoformat(),
            "fit_options": asdict(options),
            "cycles": [
                {
                    "cycle": c.cycle,
                    "store": c.store_path,
                    "granules_with_fragments": c.fragments,
                    "granules": sorted({g for names in c.granules.values() for g in names}),
                }
                for c in self.cycles
            ],
        }


def cycle_store_urls(cycles: Sequence[int], stores: str | Sequence[str]) -> dict[int, str]:
    """Each cycle's store: ``stores`` is one pattern with ``{cycle}`` or one URL per cycle.

    Raises
    ------
    HeightChangePlanError
        For fewer than two distinct cycles, or stores that do not match the cycles.
    """
    cycles = [int(c) for c in cycles]
    if len(set(cycles)) != len(cycles) or len(cycles) < 2:
        raise HeightChangePlanError(f"cycles must be at least two distinct numbers, got {cycles}")
    if isinstance(stores, str):
        if "{cycle}" not in stores:
            raise HeightChangePlanError(
                f"store pattern {stores!r} lacks '{{cycle}}' (or give one store per cycle)"
            )
        return {c: stores.replace("{cycle}", str(c)) for c in sorted(cycles)}
    if len(stores) == 1 and "{cycle}" in stores[0]:
        return cycle_store_urls(cycles, stores[0])
    if len(stores) != len(cycles):
        raise HeightChangePlanError(
            f"{len(stores)} stores for {len(cycles)} cycles: give one per cycle or a "
            "pattern with '{cycle}'"
        )
    return dict(sorted(zip(cycles, stores, strict=True)))


def reference_epoch(cycles: Sequence[int]) -> datetime:
    """``t0``: midway between the first cycle's nominal start and the last one's end (UTC)."""
    first, last = cycle_range(min(cycles)), cycle_range(max(cycles))
    return first.start + (last.end - first.start) / 2


def plan_height_change(
    cycles: Sequence[int],
    stores: str | Sequence[str],
    config: PipelineConfig,
    *,
    endpoint: S3Endpoint | None = None,
) -> HeightChangePlan:
    """Check the cycle stores and list, per parent and cycle, the fragments to fit.

    Raises
    ------
    HeightChangePlanError
        If the config has no ``height_change`` section, a store has no
        template of this config, kept no fragments, or holds granules of
        another cycle (each error names the store), or no cycle has points.
    """
    if config.height_change is None:
        raise HeightChangePlanError(
            f"config {config.name!r} has no height_change section: its fragments carry no "
            "latitude, longitude and time to fit"
        )
    urls = cycle_store_urls(cycles, stores)
    scanned = tuple(
        scan_cycle_store(cycle, url, config, endpoint=endpoint) for cycle, url in urls.items()
    )
    parents = sorted({p for c in scanned for p in c.granules})
    if not parents:
        raise HeightChangePlanError(f"no fragment of cycles {list(urls)} holds any point")
    return HeightChangePlan(
        config=config,
        epoch=reference_epoch(list(urls)),
        cycles=scanned,
        parents=np.array(parents, dtype=np.uint64),
    )


def scan_cycle_store(
    cycle: int, url: str, config: PipelineConfig, *, endpoint: S3Endpoint | None = None
) -> CycleStore:
    """One cycle's store: its template checked, its extract and cell records read."""
    where = f"store {url} (cycle {cycle})"
    store = open_store(url, endpoint=endpoint or S3Endpoint.from_env(), read_only=True)
    template = read_template(store, config)
    if template is None:
        raise HeightChangePlanError(
            f"{where} has no finished magg template for order {config.output.child_order}: "
            "check the store URL (or pattern), or run process-cycle for that cycle first"
        )
    if template.config_hash != config.hash:
        raise HeightChangePlanError(
            f"{where} was gridded with config {template.config_hash}, this run uses "
            f"{config.hash}: every cycle must share the config"
        )
    records = read_extract_records(store, config)
    if not records:
        raise HeightChangePlanError(
            f"{where} kept no fragments: run it with `magg run --keep-fragments` "
            "(process-cycle keep_fragments=True)"
        )
    lacking = [
        granule_name(r.url)
        for r in records
        if r.status == "ok" and r.columns and set(config.point_columns) - set(r.columns)
    ]
    if lacking:
        raise HeightChangePlanError(
            f"{where} kept fragments without latitude, longitude and time ({len(lacking)} "
            f"granules, e.g. {lacking[0]}): they are kept only by `magg run --keep-fragments` "
            "(process-cycle keep_fragments=True); run the cycle again with it"
        )
    granules: dict[int, set[str]] = {}
    for record in records:
        name = granule_name(record.url)
        parsed = granule_fields(name)
        if parsed is not None and parsed.cycle != cycle:
            raise HeightChangePlanError(f"{where} holds granule {name} of cycle {parsed.cycle}")
        for parent, points in record.points.items():
            if points:
                granules.setdefault(int(parent), set()).add(name)
    for parent, cell in read_records(store, config).items():
        if cell.result.status in INCOMPLETE_STATUSES:
            failed = {granule_name(f.url) for f in cell.result.files_failed}
            granules.setdefault(parent, set()).update(failed or {"(no fragment listed)"})
    return CycleStore(
        cycle=cycle,
        store_path=url,
        granules={p: tuple(sorted(names)) for p, names in sorted(granules.items())},
        fragments=sum(r.status == "ok" for r in records),
    )


def check_output_provenance(
    url: str, config: PipelineConfig, provenance: Mapping[str, Any], endpoint: S3Endpoint | None
) -> None:
    """Refuse to add to an output store made from other cycles, stores, t0 or fit options.

    Raises
    ------
    HeightChangePlanError
        Naming the store and what differs; a store without a template passes.
    """
    store = open_store(url, endpoint=endpoint or S3Endpoint.from_env(), read_only=True)
    if read_template(store, config) is None:
        return
    group = zarr.open_group(
        store, path=str(config.output.child_order), mode="r", use_consolidated=False
    )
    stored = group.attrs[TEMPLATE_ATTR].get("provenance", {})
    keys = ("product", "reference_epoch", "fit_options")
    differ = [k for k in keys if stored.get(k) != provenance.get(k)]
    stored_cycles = [(c["cycle"], c["store"]) for c in stored.get("cycles", [])]
    if stored_cycles != [(c["cycle"], c["store"]) for c in provenance["cycles"]]:
        differ.append("cycles")
    if differ:
        raise HeightChangePlanError(
            f"output store {url} holds a product made with other {', '.join(differ)}: "
            "write to a new store"
        )
