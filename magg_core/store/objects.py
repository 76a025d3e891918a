"""Reading, writing and deleting many small objects of a store at once, with a bound.

Records, extract records, fragments, staging objects and the coarse levels'
chunks are small objects read or written by the hundred or thousand. One
after another, ~2,000 requests on S3 are ~2,000 round trips; all at once,
they open thousands of connections (or files). :func:`get_many` and
:func:`put_many` keep at most :data:`REQUESTS_IN_FLIGHT` in flight, which
turns them into a few dozen round trips. :func:`delete_prefix` removes
them with S3's bulk delete, up to 1,000 objects a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import obstore
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import ObjectStore

REQUESTS_IN_FLIGHT = 64
"""Objects fetched or put at once by :func:`get_many` and :func:`put_many`."""


async def get_one(store: Store, key: str) -> bytes | None:
    """The bytes of the object ``key``, or ``None`` if the store has none."""
    buffer = await store.get(key, prototype=default_buffer_prototype())
    return None if buffer is None else buffer.to_bytes()


async def get_many(
    store: Store, keys: Sequence[str], limit: int = REQUESTS_IN_FLIGHT
) -> list[bytes | None]:
    """The bytes of each object of ``keys`` (``None``: absent), in order, ``limit`` at a time."""
    slots = asyncio.Semaphore(limit)

    async def fetch(key: str) -> bytes | None:
        async with slots:
            return await get_one(store, key)

    return await asyncio.gather(*(fetch(key) for key in keys))


async def put_many(
    store: Store, objects: Mapping[str, bytes | None], limit: int = REQUESTS_IN_FLIGHT
) -> None:
    """Put each of ``objects`` (key → bytes; ``None``: remove the object), ``limit`` at a time."""
    slots = asyncio.Semaphore(limit)
    prototype = default_buffer_prototype()

    async def put(key: str, data: bytes | None) -> None:
        async with slots:
            if data is None:
                await store.delete(key)
            else:
                await store.set(key, prototype.buffer.from_bytes(data))

    await asyncio.gather(*(put(key, data) for key, data in objects.items()))


def delete_prefix(store: Store, prefix: str) -> None:
    """Remove every object under ``prefix`` (a folder: ``"fragments/12"``).

    On S3 (a zarr ``ObjectStore``) through obstore's bulk delete: S3's
    ``DeleteObjects``, 1,000 keys a request, where zarr's ``delete_dir`` sends
    one request a key, ten at a time -- ~70,000 fragments of a cycle were
    ~7,000 round trips. Any other store deletes through zarr.
    """
    prefix = prefix.rstrip("/") + "/"
    if not isinstance(store, ObjectStore):
        sync(store.delete_dir(prefix))
        return
    if store.read_only:
        raise ValueError(f"cannot delete {prefix!r} from a read-only store")
    sync(_delete_listed(store.store, prefix))


async def _delete_listed(inner: obstore.store.ObjectStore, prefix: str) -> None:
    metas = await obstore.list(inner, prefix).collect_async()
    if metas:
        await obstore.delete_async(inner, [m["path"] for m in metas])
