"""Tasks that prepare a run: config, catalog, and the store's template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from magg_core.catalog.catalog import Catalog, build_catalog, load_catalog
from magg_core.config import PipelineConfig, load_config
from magg_core.store.arrays import create_template, matching_template, open_store, read_template


@task(cache_policy=NONE)
def load_pipeline_config(source: str | Mapping[str, Any] | None) -> PipelineConfig:
    """Validate the config before anything is dispatched."""
    return load_config(source)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10)
def query_catalog(
    cycle: int | None,
    start_date: str | None,
    end_date: str | None,
    region: str,
    parent_order: int,
    cmr_url: str | None,
) -> Catalog:
    """Ask CMR for the granules and intersect their footprints with the region's cells."""
    return build_catalog(
        cycle=cycle,
        start=start_date,
        end=end_date,
        region=region,
        parent_order=parent_order,
        cmr_url=cmr_url,
    )


@task(cache_policy=NONE)
def read_catalog(path: str) -> Catalog:
    return load_catalog(path)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def check_store(store_path: str, config: PipelineConfig, parents: Sequence[int]) -> None:
    """Refuse a store holding another run's template, before this run writes anything there.

    :func:`prepare_store` refuses it too, but the flow makes the template
    while the extracts already write their fragments into the store.
    """
    matching_template(open_store(store_path), config, parents)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=5)
def prepare_store(
    store_path: str, config: PipelineConfig, parents: Sequence[int], provenance: Mapping[str, Any]
) -> str:
    """Create (or verify) the store's template and return its identity.

    The identity goes into every cell's cache key: a store that was deleted
    and re-created gets a new one, so no cell is skipped on an old cache hit.
    """
    store = open_store(store_path)
    create_template(store, config, parents, provenance)
    return read_template(store, config).id
