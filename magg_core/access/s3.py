"""S3 access shared by the granule reader and the Zarr store: credentials and endpoints.

Credentials are a small frozen object whose ``repr`` never shows a secret, so
one can pass it through logs, tracebacks and Prefect task arguments safely.
The endpoint is separate from the credentials because NSIDC's bucket, an
output bucket and a test server differ only in where they live.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from obstore.store import S3Store

NSIDC_REGION = "us-west-2"
"""NSIDC's temporary S3 credentials work only in this region."""


@dataclass(frozen=True)
class S3Credentials:
    """Temporary (or static) AWS credentials; secrets stay out of ``repr``."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expiration: datetime | None = None

    def __repr__(self) -> str:
        # Show only a short, non-secret hint of which key this is.
        hint = f"{self.access_key_id[:4]}…"
        return f"S3Credentials(access_key_id='{hint}', expiration={self.expiration!r})"

    __str__ = __repr__

    @classmethod
    def from_event(cls, payload: dict[str, Any]) -> S3Credentials:
        """From the NSIDC s3credentials / Lambda-event form (``accessKeyId`` …)."""
        missing = [k for k in ("accessKeyId", "secretAccessKey") if not payload.get(k)]
        if missing:
            raise ValueError(f"s3_credentials is missing {', '.join(missing)}")
        expiration = payload.get("expiration")
        if isinstance(expiration, str):
            expiration = datetime.fromisoformat(expiration)
        return cls(
            access_key_id=payload["accessKeyId"],
            secret_access_key=payload["secretAccessKey"],
            session_token=payload.get("sessionToken"),
            expiration=expiration,
        )

    def to_event(self) -> dict[str, str]:
        """The Lambda-event form. Only for payloads sent to a worker, never for logs."""
        event = {"accessKeyId": self.access_key_id, "secretAccessKey": self.secret_access_key}
        if self.session_token:
            event["sessionToken"] = self.session_token
        return event

    def secrets(self) -> tuple[str, ...]:
        """The secret strings, for redaction checks."""
        return tuple(s for s in (self.secret_access_key, self.session_token) if s)


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3 API lives: AWS itself (``url=None``) or any compatible server."""

    url: str | None = None
    region: str = NSIDC_REGION

    @classmethod
    def from_env(cls, region: str | None = None) -> S3Endpoint:
        """Honour botocore's standard ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``."""
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(url=url, region=region or NSIDC_REGION)

    @property
    def allow_http(self) -> bool:
        return bool(self.url and self.url.startswith("http://"))


def s3_store(
    bucket: str,
    *,
    prefix: str | None = None,
    credentials: S3Credentials | None,
    endpoint: S3Endpoint,
) -> S3Store:
    """An obstore ``S3Store`` with explicit credentials.

    obstore reads ``AWS_*`` variables from the environment on construction;
    every credential field is therefore set explicitly here so a request's
    credentials are never mixed with ambient ones. ``credentials=None`` means
    the ambient identity (e.g. a Lambda role) is wanted on purpose.
    """
    options: dict[str, Any] = {
        "region": endpoint.region,
        # A bounded wait: a request whose answer never comes (seen on loopback: a ranged
        # GET parked for good, the server idle) times out and obstore retries it, instead
        # of holding its thread for ever.
        "client_options": {"timeout": "30s", "connect_timeout": "5s"},
    }
    if endpoint.url:
        options["endpoint"] = endpoint.url
    if endpoint.allow_http:
        options["client_options"]["allow_http"] = True
    if credentials is not None:
        options["access_key_id"] = credentials.access_key_id
        options["secret_access_key"] = credentials.secret_access_key
        options["token"] = credentials.session_token or ""
    return S3Store(bucket, prefix=prefix, **options)
