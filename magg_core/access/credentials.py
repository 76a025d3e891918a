"""S3 credentials for a run, refreshed before they lapse.

NSIDC's S3 credentials are temporary (one hour) while a cycle takes longer,
so a run holds a :class:`Credentials` object and calls
:meth:`Credentials.refresh_if_needed` before handing credentials to a batch
of cells: with less than the margin (15 minutes by default) left, it fetches
new ones, so no cell starts with credentials about to expire. When S3 refuses
credentials before their stated expiry (revoked, or an expired session), a
cell calls :meth:`Credentials.reject` and the next refresh fetches new ones.

NSIDC's endpoint fails for a moment now and then (a 5xx, an HTML maintenance
or login page with status 200, a dropped connection, no answer): such a
failure is retried with exponential backoff (:class:`RetryPolicy`); a 401/403
(the Earthdata login refused) is not.

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
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol
from urllib.parse import urlparse

import boto3
import botocore.exceptions
import requests
from earthaccess import Auth
from earthaccess.daac import DAACS
from earthaccess.exceptions import LoginAttemptFailure, LoginStrategyUnavailable
from earthaccess.system import PROD, System

from magg_core.access.s3 import S3Credentials
from magg_core.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

DEFAULT_MARGIN = timedelta(minutes=15)
EDL_HOST = PROD.edl_hostname
NSIDC_S3CREDENTIALS_URL = next(d["s3-credentials"] for d in DAACS if d["short-name"] == "NSIDC")
EDL_HOST_ENV = "MAGG_EDL_HOST"
S3CREDENTIALS_URL_ENV = "MAGG_S3CREDENTIALS_URL"
"""Environment overrides of the two endpoints, so a whole run can be pointed at a test fake."""

NSIDC_FIELDS = ("accessKeyId", "secretAccessKey", "sessionToken", "expiration")
"""What NSIDC's s3credentials answer always holds; without any of them it is unusable."""
REFUSED_STATUSES = frozenset({401, 403})
"""The Earthdata login was not accepted: asking again gives the same answer."""
MOMENTARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses of an endpoint that is busy, restarting or behind a failing gateway."""

Clock = Callable[[], datetime]


class CredentialsError(PermanentError, RuntimeError):
    """Credentials could not be had; the message says why, never with a secret in it."""


class _MomentaryFailure(TransientError):
    """One attempt at s3credentials failed in a way that may pass; the text is safe to show."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a momentary failure of the credentials endpoint is retried.

    The n-th retry waits ``first_delay_s * 2**(n-1)``, at most ``max_delay_s``.
    At most ``attempts`` requests are made, and none starts later than
    ``total_s`` after the first, so a fetch gives up within ``total_s`` plus
    one request's timeouts. The defaults (5 attempts, waits of 1, 2, 4 and 8 s)
    ride out a restarting endpoint without holding a run's dispatch for long:
    every cell waits for the refresh. ``sleep`` and ``monotonic`` are
    injectable so tests need not wait.

    Raises
    ------
    ValueError
        On construction, for a count below 1, a negative delay or budget, or a
        timeout that is not positive; the message names the field.
    """

    attempts: int = 5
    first_delay_s: float = 1.0
    max_delay_s: float = 8.0
    total_s: float = 60.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    """earthaccess's own ``get_s3_credentials`` waits 15 s."""
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    monotonic: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts!r}")
        for name in ("first_delay_s", "max_delay_s", "total_s"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"RetryPolicy.{name} must not be negative, got {getattr(self, name)!r}"
                )
        for name in ("connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"RetryPolicy.{name} must be positive, got {getattr(self, name)!r}"
                )

    @property
    def timeout(self) -> tuple[float, float]:
        """The ``(connect, read)`` timeout of one request, as requests takes it."""
        return (self.connect_timeout_s, self.read_timeout_s)

    def delay_after(self, failed: int, elapsed_s: float) -> float | None:
        """The wait before the next attempt after ``failed`` failures, or ``None`` to give up."""
        if failed >= self.attempts:
            return None
        delay = min(self.first_delay_s * 2 ** (failed - 1), self.max_delay_s)
        return delay if elapsed_s + delay <= self.total_s else None


class CredentialSource(Protocol):
    """Where credentials come from; ``fetch`` returns fresh ones each call."""

    @property
    def description(self) -> str: ...

    def fetch(self) -> S3Credentials: ...


@dataclass(frozen=True)
class NsidcSource:
    """NSIDC's temporary S3 credentials for an Earthdata login (earthaccess ``Auth``).

    The GET goes through earthaccess's session (``Auth.get_session``: the
    bearer token, and Basic auth resent to the Earthdata host), but not
    through ``Auth.get_s3_credentials``: that one answers every failure with
    ``{}`` (a 503 looks like a refused login), lets a 200 HTML page escape as a
    JSON error, and logs the first 1,000 characters of an error body. Telling
    a momentary failure from a refusal needs the status and the body, so the
    retry is a loop here rather than a urllib3 ``Retry`` on the session, which
    sees neither a 200 HTML page nor JSON without the credentials.

    Raises
    ------
    CredentialsError
        On construction, if ``url`` is not https (earthaccess sends the
        Earthdata token only over https).
    """

    auth: Auth = field(repr=False)
    url: str = NSIDC_S3CREDENTIALS_URL
    retry: RetryPolicy = field(default_factory=RetryPolicy, repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith("https://"):
            raise CredentialsError(
                f"s3credentials URL {self.url!r} is not https: the Earthdata token is only "
                "sent over https"
            )

    @property
    def description(self) -> str:
        return f"NSIDC s3credentials at {self.url}"

    def fetch(self) -> S3Credentials:
        """New credentials, retrying momentary failures (see :class:`RetryPolicy`).

        Raises
        ------
        CredentialsError
            At once when the endpoint refuses the login (401/403) or answers a
            status that no retry changes (e.g. 404); after the last attempt for
            momentary failures, listing each attempt's HTTP status and what
            the body looked like ("an HTML page", "JSON without accessKeyId"),
            or how the connection failed. Never a body's content nor a token.
        """
        started = self.retry.monotonic()
        failures: list[str] = []
        with self.auth.get_session() as session:
            while True:
                try:
                    return self._fetch_once(session)
                except _MomentaryFailure as failure:
                    failures.append(str(failure))
                elapsed = self.retry.monotonic() - started
                delay = self.retry.delay_after(len(failures), elapsed)
                if delay is None:
                    raise CredentialsError(
                        f"no S3 credentials from {self.url} after {len(failures)} attempt(s) "
                        f"in {elapsed:.1f}s: {'; '.join(failures)}"
                    )
                log.warning(
                    "%s: %s (attempt %d of %d); retrying in %.1fs",
                    self.description,
                    failures[-1],
                    len(failures),
                    self.retry.attempts,
                    delay,
                )
                self.retry.sleep(delay)

    def _fetch_once(self, session: requests.Session) -> S3Credentials:
        try:
            response = session.get(self.url, timeout=self.retry.timeout)
        except requests.Timeout as exc:
            connect, read = self.retry.timeout
            raise _MomentaryFailure(
                f"no answer in time ({type(exc).__name__}; connect {connect:g}s, read {read:g}s)"
            ) from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _MomentaryFailure(f"connection failed ({type(exc).__name__})") from None
        except requests.RequestException as exc:
            raise CredentialsError(f"cannot reach {self.url}: {type(exc).__name__}") from None
        with response:
            status = f"HTTP {response.status_code}{_redirect_note(self.url, response)}"
            if response.status_code in REFUSED_STATUSES:
                raise CredentialsError(
                    f"{self.url} refused S3 credentials ({status}; not retried): the Earthdata "
                    "login was not accepted (expired or wrong token?) or the account has not "
                    "authorized NSIDC's data access"
                )
            credentials, body = _read_credentials(response)
            if response.status_code in MOMENTARY_STATUSES:
                raise _MomentaryFailure(f"{status} with {body}")
            if not response.ok:
                raise CredentialsError(f"{self.url} answered {status} with {body}; not retried")
            if credentials is None:
                raise _MomentaryFailure(f"{status} with {body}")
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
    """The current S3 credentials of one source, refetched when they near expiry or S3 refuses them.

    Thread-safe: cells running in threads may call :meth:`refresh_if_needed`
    and :meth:`reject` together and the source is asked once.
    """

    def __init__(self, source: CredentialSource, *, clock: Clock | None = None):
        self._source = source
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._rejected = False
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

        Credentials that S3 rejected (:meth:`reject`) are replaced whatever
        their stated expiry.

        Returns
        -------
        S3Credentials
            Credentials valid for at least ``margin`` (unless the source itself
            hands out shorter-lived ones).

        Raises
        ------
        CredentialsError
            From the source, when new credentials are due and cannot be had; a
            rejection then stands, so the next call tries again.
        """
        with self._lock:
            left = self.remaining()
            if self._rejected:
                log.info(
                    "S3 rejected credentials %s from %s: fetching new ones",
                    _key_hint(self._current),
                    self._source.description,
                )
            elif left is not None and left < margin:
                log.info(
                    "S3 credentials from %s expire in %ss (< %ss): fetching new ones",
                    self._source.description,
                    int(left.total_seconds()),
                    int(margin.total_seconds()),
                )
            else:
                return self._current
            self._current = self._fetch()
            self._rejected = False
            return self._current

    def reject(self, rejected: S3Credentials) -> None:
        """S3 refused ``rejected`` (ExpiredToken, InvalidToken, AccessDenied on a granted bucket).

        If they are still the current credentials, the next
        :meth:`refresh_if_needed` fetches new ones; if they were already
        replaced (another cell rejected them first), nothing happens, so many
        cells rejecting the same credentials cause one fetch. Credentials are
        matched by access key id, which identifies temporary credentials and
        survives the Lambda event form (which drops the expiry).
        """
        with self._lock:
            if rejected.access_key_id != self._current.access_key_id:
                log.debug("S3 rejected credentials %s, already replaced", _key_hint(rejected))
                return
            self._rejected = True

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
    *,
    edl_host: str | None = None,
    s3credentials_url: str | None = None,
    clock: Clock | None = None,
    retry: RetryPolicy | None = None,
) -> Credentials:
    """Log in to Earthdata and fetch NSIDC S3 credentials (refreshable).

    Raises
    ------
    CredentialsError
        See :func:`earthdata_login` and :meth:`NsidcSource.fetch`.
    """
    auth = earthdata_login(edl_host=edl_host)
    url = s3credentials_url or os.environ.get(S3CREDENTIALS_URL_ENV) or NSIDC_S3CREDENTIALS_URL
    return Credentials(NsidcSource(auth=auth, url=url, retry=retry or RetryPolicy()), clock=clock)


def aws_credentials(profile: str | None = None, *, clock: Clock | None = None) -> Credentials:
    """Plain AWS credentials from the environment or ``profile`` (no expiry tracked)."""
    return Credentials(AwsSource(profile=profile), clock=clock)


def _key_hint(credentials: S3Credentials) -> str:
    return credentials.access_key_id[:4] + "…"


def _read_credentials(response: requests.Response) -> tuple[S3Credentials | None, str]:
    """The credentials in an s3credentials answer, or ``None`` and what the body looked like.

    The description names the body's kind and missing fields, never its
    content: an error page may repeat the request, token included.
    """
    content = response.content
    if not content.strip():
        return None, "an empty body"
    if "html" in response.headers.get("Content-Type", "").lower() or content.lstrip()[:1] == b"<":
        return None, "an HTML page"
    try:
        payload = json.loads(content)
    except ValueError:
        return None, "a body that is not JSON"
    if not isinstance(payload, dict):
        return None, "JSON that is not an object"
    missing = [
        name for name in NSIDC_FIELDS if not payload.get(name) or not isinstance(payload[name], str)
    ]
    if missing:
        return None, f"JSON without {', '.join(missing)}"
    try:
        credentials = S3Credentials.from_event(payload)
    except ValueError:
        return None, "JSON with an unreadable expiration"
    if credentials.expiration.tzinfo is None:
        credentials = dataclasses.replace(
            credentials, expiration=credentials.expiration.replace(tzinfo=UTC)
        )
    return credentials, "S3 credentials"


def _redirect_note(url: str, response: requests.Response) -> str:
    """`` from <host> (redirected)`` when the answer came from another host, e.g. a login page."""
    host = urlparse(response.url).hostname
    return "" if host == urlparse(url).hostname else f" from {host} (redirected)"
