"""One cache key for every per-parent task: what its output depends on, and nothing secret.

Prefect skips a task run whose key it has a completed result for. A parent's
output depends on its inputs' fingerprint (which also names the config and the
magg version), the store it is written to, and that store's identity:
``store_id`` changes when a store is re-created, so a deleted store is
re-filled instead of being skipped on the strength of an old cache entry.
Credentials never enter the key (they are not in the material).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def parent_cache_key(
    kind: str, parent_morton: int, fingerprint: str, store_path: str, store_id: str, **extra: Any
) -> str:
    """``magg-{kind}-{parent}-{digest}``: the digest of the material above, plus ``extra``
    (JSON-serialisable values that also decide the output, e.g. the orders)."""
    material = {
        "parent": str(parent_morton),
        "inputs": fingerprint,
        "store": store_path,
        "store_id": store_id,
        **extra,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return f"magg-{kind}-{parent_morton}-{digest[:24]}"
