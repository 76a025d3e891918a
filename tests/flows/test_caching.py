"""One cache key for every per-parent task: each thing the output depends on changes it."""

from __future__ import annotations

import re

from magg.tasks.caching import parent_cache_key

BASE = dict(
    kind="cell",
    parent_morton=-5111111,
    fingerprint="f" * 64,
    store_path="s3://bucket/out.zarr",
    store_id="id-1",
)


def test_the_key_names_the_kind_and_the_parent_and_is_stable():
    key = parent_cache_key(**BASE)
    assert re.fullmatch(r"magg-cell--5111111-[0-9a-f]{24}", key)
    assert parent_cache_key(**BASE) == key


def test_every_input_of_the_output_changes_the_key():
    key = parent_cache_key(**BASE)
    changed = [
        {"kind": "dhdt"},
        {"parent_morton": -5111112},
        {"fingerprint": "e" * 64},
        {"store_path": "s3://bucket/other.zarr"},
        {"store_id": "id-2"},
    ]
    keys = {parent_cache_key(**{**BASE, **change}) for change in changed}
    keys.add(parent_cache_key(**BASE, orders=[6, 12]))
    assert key not in keys and len(keys) == len(changed) + 1
