"""Reading many small objects of a store at once, with a bound.

Records, extract records, fragments and staging objects are small objects
read by the hundred or thousand. Read one after another, ~2,000 GETs on S3
are ~2,000 round trips; all at once, they open thousands of connections (or
files). :func:`get_many` keeps at most :data:`READ_CONCURRENCY` in flight,
which turns them into a few dozen round trips.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype

READ_CONCURRENCY = 64
"""Objects fetched at once by :func:`get_many`."""


async def get_one(store: Store, key: str) -> bytes | None:
    """The bytes of the object ``key``, or ``None`` if the store has none."""
    buffer = await store.get(key, prototype=default_buffer_prototype())
    return None if buffer is None else buffer.to_bytes()


async def get_many(
    store: Store, keys: Sequence[str], limit: int = READ_CONCURRENCY
) -> list[bytes | None]:
    """The bytes of each object of ``keys`` (``None``: absent), in order, ``limit`` at a time."""
    slots = asyncio.Semaphore(limit)

    async def fetch(key: str) -> bytes | None:
        async with slots:
            return await get_one(store, key)

    return await asyncio.gather(*(fetch(key) for key in keys))
