"""Credentials for child flow runs, handed over through a Prefect Secret block.

Child runs (ECS containers) cannot share the parent's in-process credential
source, and flow parameters are stored in the clear, so the parent publishes
its current NSIDC credentials to a Secret block whenever they change and the
children read them from there.
"""

from __future__ import annotations

import threading

from prefect.blocks.system import Secret

from magg_core.credentials import CredentialSource
from magg_core.s3 import S3Credentials

_published: dict[str, S3Credentials] = {}
_lock = threading.Lock()


def publish_credentials(source: CredentialSource, block_name: str) -> None:
    """Write the source's current credentials to the block, if they changed."""
    credentials = source.current()
    if credentials is None:
        return
    with _lock:
        if _published.get(block_name) == credentials:
            return
        payload = credentials.to_event()
        if credentials.expiration is not None:
            payload["expiration"] = credentials.expiration.isoformat()
        Secret(value=payload).save(block_name, overwrite=True)
        _published[block_name] = credentials


def load_published_credentials(block_name: str) -> S3Credentials:
    """The credentials a parent run last published (read in the child run)."""
    return S3Credentials.from_event(dict(Secret.load(block_name).get()))
