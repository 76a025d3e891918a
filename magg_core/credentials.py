"""S3 credentials for a run, refreshed before they lapse.

NSIDC's S3 credentials are temporary (one hour) while a cycle takes longer,
so a run holds a :class:`Credentials` object and calls
:meth:`Credentials.refresh_if_needed` before handing credentials to a batch
of cells: with less than the margin (15 minutes by default) left, it fetches
new ones, so no cell starts with credentials about to expire.

Two sources: an Earthdata login (earthaccess; ``EARTHDATA_TOKEN``, or
``EARTHDATA_USERNAME``/``EARTHDATA_PASSWORD``, or a netrc entry) exchanged
at NSIDC's ``s3credentials`` endpoint; or plain AWS credentials from the
environment or a profile, for S3 data elsewhere (and the tests' moto server).

Secrets never leave these objects in text: ``repr``/``str`` show a key
prefix and the expiry, log lines name hosts, users and times, and errors
say what failed without echoing what was sent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import boto3
import botocore.exceptions
import requests
from earthaccess import Auth
from earthaccess.daac import DAACS
from earthaccess.exceptions import LoginAttemptFailure, LoginStrategyUnavailable
from earthaccess.system import PROD, System

from magg_core.s3 import S3Credentials

log = logging.getLogger(__name__)

DEFAULT_MARGIN = timedelta(minutes=15)
EDL_HOST = PROD.edl_hostname
NSIDC_S3CREDENTIALS_URL = next(d["s3-credentials"] for d in DAACS if d["short-name"] == "NSIDC")
EDL_HOST_ENV = "MAGG_EDL_HOST"
S3CREDENTIALS_URL_ENV = "MAGG_S3CREDENTIALS_URL"
"""Environment overrides of the two endpoints, so a whole run can be pointed at a test fake."""

Clock = Callable[[], datetime]


class CredentialsError(RuntimeError):
    """Credentials could not be had; the message says why, never with a secret in it."""


class CredentialSource(Protocol):
    """Where credentials come from; ``fetch`` returns fresh ones each call."""

    @property
    def description(self) -> str: ...

    def fetch(self) -> S3Credentials: ...


@dataclass(frozen=True)
class NsidcSource:
    """NSIDC's temporary S3 credentials for an Earthdata login (earthaccess ``Auth``)."""

    auth: Auth = field(repr=False)
    url: str = NSIDC_S3CREDENTIALS_URL

    @property
    def description(self) -> str:
        return f"NSIDC s3credentials at {self.url}"

    def fetch(self) -> S3Credentials:
        try:
            payload = self.auth.get_s3_credentials(endpoint=self.url)
        except requests.RequestException as exc:
            raise CredentialsError(f"cannot reach {self.url}: {type(exc).__name__}") from None
        if not payload:
            raise CredentialsError(
                f"{self.url} refused S3 credentials: the Earthdata login was not accepted "
                "(expired or wrong token?) or the account has not authorized NSIDC's data access"
            )
        try:
            credentials = S3Credentials.from_event(payload)
        except (ValueError, TypeError) as exc:
            raise CredentialsError(
                f"{self.url} answered with unusable credentials: {exc}"
            ) from None
        if credentials.expiration is not None and credentials.expiration.tzinfo is None:
            credentials = dataclasses.replace(
                credentials, expiration=credentials.expiration.replace(tzinfo=UTC)
            )
        return credentials


@dataclass(frozen=True)
class AwsSource:
    """Plain AWS credentials as boto3 finds them: environment, shared files, a profile."""

    profile: str | None = None

    @property
    def description(self) -> str:
        return f"AWS profile {self.profile!r}" if self.profile else "AWS default credential chain"

    def fetch(self) -> S3Credentials:
        try:
            found = boto3.Session(profile_name=self.profile).get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise CredentialsError(f"AWS profile {self.profile!r} not found") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise CredentialsError(f"cannot load AWS credentials: {type(exc).__name__}") from None
        if found is None:
            raise CredentialsError(
                f"no AWS credentials found ({self.description}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or name a profile"
            )
        frozen = found.get_frozen_credentials()
        return S3Credentials(
            access_key_id=frozen.access_key,
            secret_access_key=frozen.secret_key,
            session_token=frozen.token,
        )


class Credentials:
    """The current S3 credentials of one source, refetched when they near expiry.

    Thread-safe: cells running in threads may call :meth:`refresh_if_needed`
    together and the source is asked once.
    """

    def __init__(self, source: CredentialSource, *, clock: Clock | None = None):
        self._source = source
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._current = self._fetch()

    @property
    def source(self) -> CredentialSource:
        return self._source

    @property
    def current(self) -> S3Credentials:
        """The credentials as last fetched (possibly near expiry: see :meth:`refresh_if_needed`)."""
        return self._current

    @property
    def expiration(self) -> datetime | None:
        return self._current.expiration

    def remaining(self) -> timedelta | None:
        """Time until expiry; ``None`` for credentials that do not expire."""
        if self.expiration is None:
            return None
        return self.expiration - self._clock()

    def refresh_if_needed(self, margin: timedelta = DEFAULT_MARGIN) -> S3Credentials:
        """Fetch new credentials when less than ``margin`` of validity is left.

        Returns
        -------
        S3Credentials
            Credentials valid for at least ``margin`` (unless the source itself
            hands out shorter-lived ones).
        """
        with self._lock:
            left = self.remaining()
            if left is not None and left < margin:
                log.info(
                    "S3 credentials from %s expire in %ss (< %ss): fetching new ones",
                    self._source.description,
                    int(left.total_seconds()),
                    int(margin.total_seconds()),
                )
                self._current = self._fetch()
            return self._current

    def _fetch(self) -> S3Credentials:
        credentials = self._source.fetch()
        log.info(
            "S3 credentials from %s, key %s, expire %s",
            self._source.description,
            _key_hint(credentials),
            credentials.expiration.isoformat() if credentials.expiration else "never",
        )
        return credentials

    def __repr__(self) -> str:
        expiry = self.expiration.isoformat() if self.expiration else "never"
        return (
            f"Credentials(source={self._source.description!r}, "
            f"access_key_id={_key_hint(self._current)!r}, expiration={expiry!r})"
        )

    __str__ = __repr__


def earthdata_login(*, edl_host: str | None = None) -> Auth:
    """Log in to Earthdata with what the environment offers, via earthaccess.

    Tried in order: ``EARTHDATA_TOKEN`` or ``EARTHDATA_USERNAME`` +
    ``EARTHDATA_PASSWORD`` (earthaccess's ``environment`` strategy), then the
    netrc file (``$NETRC`` or ``~/.netrc``) entry for the Earthdata host.
    With a token, earthaccess does not contact Earthdata: a bad token shows
    when credentials are first fetched.

    Raises
    ------
    CredentialsError
        If nothing is configured, or Earthdata rejects the username and
        password; the message names the host and user, never the secret.
    """
    host = edl_host or os.environ.get(EDL_HOST_ENV) or EDL_HOST
    system = System(PROD.cmr_base_url, PROD.status_url, PROD.status_api_url, host)
    unavailable = []
    for strategy in ("environment", "netrc"):
        auth = Auth()
        try:
            auth.login(strategy=strategy, system=system)
        except LoginStrategyUnavailable as exc:
            unavailable.append(f"{strategy}: {exc}")
            continue
        except LoginAttemptFailure:
            raise CredentialsError(
                f"Earthdata login at {host} failed for user {auth.username!r} ({strategy}): "
                "the username or password was rejected"
            ) from None
        except requests.RequestException as exc:
            raise CredentialsError(
                f"cannot reach Earthdata login at {host}: {type(exc).__name__}"
            ) from None
        if auth.authenticated:
            log.info(
                "logged in to Earthdata at %s (%s%s)",
                host,
                strategy,
                f", user {auth.username}" if auth.username else ", token",
            )
            return auth
    partial = [
        name for name in ("EARTHDATA_USERNAME", "EARTHDATA_PASSWORD") if os.environ.get(name)
    ]
    hint = f" ({partial[0]} is set without its partner)" if len(partial) == 1 else ""
    raise CredentialsError(
        f"no Earthdata credentials configured{hint}: set EARTHDATA_TOKEN, or EARTHDATA_USERNAME "
        f"and EARTHDATA_PASSWORD, or add 'machine {host} login … password …' to your netrc. "
        f"Tried: {'; '.join(unavailable)}"
    )


def nsidc_credentials(
    *, edl_host: str | None = None, s3credentials_url: str | None = None, clock: Clock | None = None
) -> Credentials:
    """Log in to Earthdata and fetch NSIDC S3 credentials (refreshable)."""
    auth = earthdata_login(edl_host=edl_host)
    url = s3credentials_url or os.environ.get(S3CREDENTIALS_URL_ENV) or NSIDC_S3CREDENTIALS_URL
    return Credentials(NsidcSource(auth=auth, url=url), clock=clock)


def aws_credentials(profile: str | None = None, *, clock: Clock | None = None) -> Credentials:
    """Plain AWS credentials from the environment or ``profile`` (no expiry tracked)."""
    return Credentials(AwsSource(profile=profile), clock=clock)


def _key_hint(credentials: S3Credentials) -> str:
    return credentials.access_key_id[:4] + "…"
