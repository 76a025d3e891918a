"""Which URLs a cell may read and write when its request comes from outside.

A cell request that arrives as an event — a Lambda invocation, the parameters
of an ECS child run — is written by whoever may invoke the function, so its
URLs are untrusted. Its granules may only be S3 objects: a local path or a
``file://`` URL would let a caller read the worker's own files (and see their
first bytes in a failure reason). Local granules remain possible through an
operator's mirror (:func:`magg_core.grid.plan.plan_cells`), which never comes from
an event. The Lambda handler writes only below the store prefixes its operator
allowed in :data:`ALLOWED_STORES_VARIABLE`, never to a bucket an event names.

Sources: S3 bucket naming rules (3–63 characters: lowercase letters, digits,
dots and hyphens, starting and ending with a letter or digit); NSIDC serves
every object of its buckets at ``https://data.nsidc.earthdatacloud.nasa.gov/
<bucket>/<key>`` too (docs/architecture.md §URLs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from magg_core.errors import InputError

NSIDC_DATA_HOST = "data.nsidc.earthdatacloud.nasa.gov"
"""NSIDC's HTTPS host; ``https://{host}/{bucket}/{key}`` is ``s3://{bucket}/{key}``."""

ALLOWED_STORES_VARIABLE = "MAGG_ALLOWED_STORES"
"""The Lambda function's environment variable: comma-separated ``s3://bucket/prefix/``
store prefixes it may write below. Set at deploy time; unset means no store at all."""

ACCEPTED_GRANULES = f"s3://bucket/key or https://{NSIDC_DATA_HOST}/bucket/key"

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME_MEANING = {"": "a local path", "file": "a local file"}


class URLError(InputError, ValueError):
    """A URL a cell may not use; the message says why without repeating the whole URL."""


@dataclass(frozen=True)
class S3Location:
    """An S3 bucket and the segments of a key (or key prefix), ``.`` and ``..`` resolved."""

    bucket: str
    segments: tuple[str, ...]

    @property
    def url(self) -> str:
        return "/".join((f"s3://{self.bucket}", *self.segments))

    @property
    def key(self) -> str:
        """The object key (or key prefix) without leading or trailing ``/``; ``""`` for none."""
        return "/".join(self.segments)

    def is_within(self, prefix: S3Location) -> bool:
        """True when this location is ``prefix`` or below it, segment by segment.

        Comparing whole segments is what keeps ``s3://b/a`` from allowing
        ``s3://b/ab``, and comparing buckets exactly keeps ``s3://b`` from
        allowing ``s3://b-evil``.
        """
        n = len(prefix.segments)
        return self.bucket == prefix.bucket and self.segments[:n] == prefix.segments


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket/key`` → its bucket and normalised key segments.

    The scheme is case-insensitive (``S3://`` is ``s3://``, RFC 3986); empty
    and ``.`` segments are dropped and ``..`` removes the segment before it,
    so a prefix check on the result cannot be walked around.

    Raises
    ------
    URLError
        If the scheme is not ``s3``, the bucket is not a valid bucket name
        (this also refuses user info and ports), the URL has a query, a
        fragment or control characters, or ``..`` climbs above the bucket.
    """
    parts = _split(url)
    if parts.scheme.lower() != "s3":
        raise URLError(f"scheme {parts.scheme!r} is not s3")
    if not parts.netloc:
        raise URLError("s3 URL has no bucket (expected s3://bucket/key)")
    if not _BUCKET.fullmatch(parts.netloc):
        raise URLError(f"{parts.netloc[:70]!r} is not a valid S3 bucket name")
    return S3Location(parts.netloc, _normalised_segments(parts.path))


def s3_location(url: str, what: str) -> S3Location:
    """:func:`parse_s3_url`, with an error naming ``what`` the URL is and the URL itself.

    For URLs an operator or a trusted caller gave (a store to open, a granule
    to read), where quoting the URL helps and reveals nothing.

    Raises
    ------
    URLError
        As :func:`parse_s3_url`; the message starts ``"{what} '{url}': "``.
    """
    try:
        return parse_s3_url(url)
    except URLError as exc:
        raise URLError(f"{what} {url[:200]!r}: {exc}") from None


def granule_url(url: object) -> str:
    """The canonical ``s3://bucket/key`` of a granule URL from a catalog or an event.

    Accepted: ``s3://bucket/key`` (any scheme case), and NSIDC's HTTPS form
    ``https://data.nsidc.earthdatacloud.nasa.gov/bucket/key``, which is
    *mapped* to the same ``s3://`` URL rather than refused: it names the same
    object, the cell reads S3 with the request's NSIDC credentials either way,
    and one canonical form keeps a cell's input fingerprint the same whichever
    form a caller sent.

    Raises
    ------
    URLError
        For anything else — a local path, ``file://``, another scheme or
        host, a bucket without a key — naming the scheme.
    """
    if not isinstance(url, str) or not url.strip():
        raise URLError(f"empty granule URL (expected {ACCEPTED_GRANULES})")
    scheme = _split(url).scheme.lower()
    if scheme == "s3":
        location = parse_s3_url(url)
    elif scheme == "https":
        location = _nsidc_https(url)
    else:
        meaning = _SCHEME_MEANING.get(scheme)
        described = f"scheme {scheme!r}" + (f" ({meaning})" if meaning else "")
        raise URLError(f"{described} is not accepted: expected {ACCEPTED_GRANULES}")
    if not location.segments:
        raise URLError(f"s3 URL of bucket {location.bucket!r} names no object")
    return location.url


def granule_name(url: str) -> str:
    """The granule's file name: the last ``/``-separated segment of ``url``.

    What keys its fragments and a cell's input fingerprint, whatever bucket
    or mirror it came from: ``s3://b/ATL06/x.h5``, ``https://host/b/x.h5``,
    ``file:///m/x.h5`` and ``/m/x.h5`` all name ``x.h5`` (a ``file://`` name
    stays percent-encoded here; decoding it is the reader's business). A
    name without ``/`` is returned as it is.

    Raises
    ------
    URLError
        If ``url`` is empty or ends in ``/`` (a prefix, not an object); the
        message quotes it.
    """
    name = url.rsplit("/", 1)[-1] if isinstance(url, str) else ""
    if not name:
        raise URLError(f"granule URL {str(url)[:200]!r} names no file (empty, or ends in '/')")
    return name


def parse_allowed_stores(value: str | None) -> tuple[S3Location, ...]:
    """The store prefixes of :data:`ALLOWED_STORES_VARIABLE` (comma-separated ``s3://`` URLs).

    Raises
    ------
    URLError
        If the variable is unset or empty (every store is refused: fail
        closed), or an entry is not an ``s3://bucket[/prefix]`` URL.
    """
    entries = [entry.strip() for entry in (value or "").split(",") if entry.strip()]
    if not entries:
        raise URLError(
            f"{ALLOWED_STORES_VARIABLE} is not set: this function writes to no store until "
            "its operator allows some (python -m deployments.aws.deploy --allowed-store ...)"
        )
    prefixes = []
    for entry in entries:
        try:
            prefixes.append(parse_s3_url(entry))
        except URLError as exc:
            raise URLError(f"{ALLOWED_STORES_VARIABLE} entry {entry[:100]!r}: {exc}") from None
    return tuple(prefixes)


def allowed_store(url: str, allowed: str | None) -> str:
    """The normalised ``s3://`` URL of ``url`` if it lies below an allowed prefix.

    Parameters
    ----------
    url
        The store URL a request names.
    allowed
        The value of :data:`ALLOWED_STORES_VARIABLE`.

    Raises
    ------
    URLError
        If the allow-list is unset or malformed, ``url`` is not an ``s3://``
        URL, or it lies outside every allowed prefix.
    """
    prefixes = parse_allowed_stores(allowed)
    try:
        location = parse_s3_url(url)
    except URLError as exc:
        raise URLError(f"store_path {url[:200]!r}: {exc}") from None
    if not any(location.is_within(p) for p in prefixes):
        raise URLError(
            f"store_path {location.url[:200]!r} is not below a prefix allowed by "
            f"{ALLOWED_STORES_VARIABLE} ({', '.join(p.url + '/' for p in prefixes)})"
        )
    return location.url


def remote_store(url: str, allowed: str | None, *, required: bool) -> str:
    """The normalised ``s3://`` store URL a remote request (an event) may write to.

    A remote request never names a local path or ``file://`` URL: that would
    write the worker's own disk (a Lambda sandbox, an ECS container), where no
    one reads it. Below that, the operator's allow-list decides.

    Parameters
    ----------
    url
        The store URL the request names.
    allowed
        The value of :data:`ALLOWED_STORES_VARIABLE` (``None``: unset).
    required
        Whether an unset allow-list refuses every store (the Lambda function,
        whose execution role may write many buckets) rather than leaving the
        choice to the worker's own S3 permissions (an ECS task role scoped to
        the output bucket).

    Raises
    ------
    URLError
        Naming ``store_path``: not an ``s3://`` URL, or outside the allow-list.
    """
    if allowed is not None or required:
        return allowed_store(url, allowed)
    try:
        return parse_s3_url(url).url
    except URLError as exc:
        scheme = _SCHEME_MEANING.get(urlsplit(url).scheme.lower())
        why = f"{scheme} is not accepted from a remote request" if scheme else str(exc)
        raise URLError(f"store_path {url[:200]!r}: {why} (expected s3://bucket/prefix)") from None


GRANULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
"""A granule file name as NSIDC writes them (``ATL06_20181013235645_02340114_209_01.h5``,
``processed_ATL06_...h5`` of a subset): letters, digits, ``.``, ``_`` and ``-``. Nothing
that a URL or a path decodes (``%2e%2e``, ``/``, ``\\``, a leading ``.``)."""


def mirror_granule(mirror: str, name: str) -> str:
    """Where granule ``name`` lies in the operator's ``mirror``, never outside it.

    Parameters
    ----------
    mirror
        The mirror as the operator gave it, without a trailing slash: a
        directory (a path or ``file://`` URL) or a normalised ``s3://`` prefix.
    name
        The granule's file name, from a catalog (which may come from anyone).

    Returns
    -------
    str
        ``{mirror}/{name}``.

    Raises
    ------
    URLError
        If ``name`` is not a plain file name (:data:`GRANULE_NAME`: so no
        ``..``, ``/``, absolute path or percent-encoding, which a ``file://``
        URL would decode), or, for a local mirror, the file resolves outside
        the mirror's directory through a symbolic link.
    """
    if not GRANULE_NAME.fullmatch(name):
        raise URLError(
            f"granule name {name[:100]!r} is not a plain file name (letters, digits, "
            "'.', '_', '-'), so it cannot be read from a mirror"
        )
    url = f"{mirror}/{name}"
    parts = urlsplit(mirror)
    if parts.scheme.lower() in ("", "file"):
        directory = Path(unquote(parts.path) if parts.scheme else mirror)
        base = directory.resolve()
        if not (directory / name).resolve().is_relative_to(base):
            raise URLError(
                f"granule {name!r} of mirror {mirror!r} is a link to a file outside the mirror"
            )
    return url


def _split(url: str) -> SplitResult:
    if _CONTROL.search(url):
        raise URLError("URL contains control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced "[" in the host
        raise URLError(f"not a URL: {exc}") from None
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise URLError("URL has a query or fragment")
    return parts


def _nsidc_https(url: str) -> S3Location:
    parts = _split(url)
    if parts.netloc.lower() != NSIDC_DATA_HOST:
        host = parts.netloc.rpartition("@")[2][:70]  # user info may hold a password
        raise URLError(
            f"scheme 'https' of host {host!r} is not accepted: only {NSIDC_DATA_HOST} "
            f"(expected {ACCEPTED_GRANULES})"
        )
    if "%" in parts.path:
        raise URLError("percent-encoded characters are not accepted in an NSIDC https URL")
    bucket, _, key = parts.path.lstrip("/").partition("/")
    return parse_s3_url(f"s3://{bucket}/{key}")


def _normalised_segments(path: str) -> tuple[str, ...]:
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise URLError("'..' climbs above the bucket")
            segments.pop()
        else:
            segments.append(segment)
    return tuple(segments)
