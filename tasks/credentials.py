"""Credentials for child flow runs, handed over through a Prefect Secret block.

Child runs (ECS containers) cannot share the parent's in-process credential
source, and flow parameters are stored in the clear, so the parent publishes
its current NSIDC credentials to a Secret block whenever they change and the
children read them from there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prefect import task
from prefect.blocks.system import Secret
from prefect.cache_policies import NONE

from magg_core.access.credentials import Credentials, aws_credentials, nsidc_credentials
from magg_core.access.s3 import S3Credentials

CREDENTIAL_SOURCES: dict[str, Callable[[], Credentials | None]] = {
    "earthdata": nsidc_credentials,
    "environment": aws_credentials,
    "none": lambda: None,
}
"""What each ``credentials`` mode of a run opens: NSIDC's temporary S3 credentials
through an Earthdata login, plain AWS credentials (environment or profile), or
nothing (local files, public buckets)."""

_published: dict[str, S3Credentials] = {}
_lock = threading.Lock()


def publish_credentials(source: Credentials | None, block_name: str) -> S3Credentials | None:
    """Write fresh credentials to the block, if they changed since the last write.

    Returns the credentials the block now holds (``None`` without a source), so
    the caller can report them rejected if the child's S3 requests fail with them.
    """
    if source is None:
        return None
    credentials = source.refresh_if_needed()
    with _lock:
        if _published.get(block_name) == credentials:
            return credentials
        payload = credentials.to_event()
        if credentials.expiration is not None:
            payload["expiration"] = credentials.expiration.isoformat()
        Secret(value=payload).save(block_name, overwrite=True)
        _published[block_name] = credentials
    return credentials


def load_published_credentials(block_name: str) -> S3Credentials:
    """The credentials a parent run last published (read in the child run)."""
    return S3Credentials.from_event(dict(Secret.load(block_name).get()))


@task(cache_policy=NONE, persist_result=False)
def open_credentials(mode: str) -> Credentials | None:
    """Log in once for the whole run; the object refreshes itself before expiry.

    ``persist_result=False``: the credentials live only in this process's
    memory, never in result storage.
    """
    if mode not in CREDENTIAL_SOURCES:
        raise ValueError(
            f"credentials must be one of {', '.join(CREDENTIAL_SOURCES)}, got {mode!r}"
        )
    return CREDENTIAL_SOURCES[mode]()
