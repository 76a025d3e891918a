"""Earthdata login and NSIDC S3 credentials through earthaccess, against an HTTPS fake."""

import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import obstore
import pytest

from magg_core.access.credentials import (
    DEFAULT_MARGIN,
    Credentials,
    CredentialsError,
    RetryPolicy,
    aws_credentials,
    earthdata_login,
    nsidc_credentials,
)
from magg_core.access.s3 import S3Credentials, s3_store
from tests.fakes.earthdata import FakeEarthdata

USER, PASSWORD = "magg-tester", "correct-horse-battery-staple-7!"
USER_TOKEN = "edl-user-token-do-not-log-8c1f"


@pytest.fixture(scope="module")
def earthdata(tmp_path_factory):
    fake = FakeEarthdata(users={USER: PASSWORD}, tokens={USER_TOKEN})
    try:
        fake.start(tmp_path_factory.mktemp("earthdata"))
    except PermissionError:
        pytest.skip(
            "the Earthdata fake listens on port 443 (earthaccess ignores ports), which needs root"
        )
    yield fake
    fake.stop()


@pytest.fixture
def env(earthdata, monkeypatch, tmp_path):
    """Trust the fake's CA, point magg at it, and start with no credentials configured."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(earthdata.ca_bundle))
    monkeypatch.setenv("MAGG_EDL_HOST", earthdata.host)
    monkeypatch.setenv("MAGG_S3CREDENTIALS_URL", earthdata.s3credentials_url)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("EARTHDATA_TOKEN", "EARTHDATA_USERNAME", "EARTHDATA_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    earthdata.lifetime_s = 3600.0
    earthdata.reset_failures()
    return monkeypatch


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def assert_no_secrets(earthdata, *texts):
    for secret in earthdata.secrets():
        for text in texts:
            assert secret not in text


def test_token_login_fetches_nsidc_credentials(earthdata, env, logs):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    before = len(earthdata.issued)
    creds = nsidc_credentials()
    issued = earthdata.issued[-1]
    assert len(earthdata.issued) == before + 1
    current = creds.current
    assert current.access_key_id == issued.access_key_id
    assert current.secret_access_key == issued.secret_access_key
    assert current.session_token == issued.session_token
    assert current.expiration == issued.expiration and current.expiration.tzinfo is not None
    assert timedelta(minutes=59) < creds.remaining() <= timedelta(hours=1)
    assert_no_secrets(
        earthdata, repr(creds), str(creds), repr(current), repr(creds.source), logs.text
    )
    assert issued.access_key_id[:4] in repr(creds) and earthdata.s3credentials_url in repr(creds)


def test_password_login_goes_through_basic_auth(earthdata, env, logs):
    env.setenv("EARTHDATA_USERNAME", USER)
    env.setenv("EARTHDATA_PASSWORD", PASSWORD)
    earthdata.logins.clear()
    creds = nsidc_credentials()
    assert earthdata.logins == [("", 401), (USER, 200)]  # challenged, then resent with Basic auth
    assert creds.current.access_key_id == earthdata.issued[-1].access_key_id
    assert_no_secrets(earthdata, repr(creds), logs.text)
    assert USER in logs.text


def test_netrc_login(earthdata, env, tmp_path, logs):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {earthdata.host}\n  login {USER}\n  password {PASSWORD}\n")
    netrc.chmod(0o600)
    auth = earthdata_login()
    assert auth.authenticated and auth.username == USER
    assert_no_secrets(earthdata, logs.text)


def test_wrong_password_is_a_clear_error_without_the_secret(earthdata, env, logs):
    wrong = "not-the-password-3f9a"
    env.setenv("EARTHDATA_USERNAME", USER)
    env.setenv("EARTHDATA_PASSWORD", wrong)
    with pytest.raises(CredentialsError) as info:
        nsidc_credentials()
    message = str(info.value)
    assert f"Earthdata login at {earthdata.host} failed for user '{USER}'" in message
    assert "rejected" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert_no_secrets(earthdata, message, logs.text)
    assert wrong not in message and wrong not in logs.text


def test_bad_token_fails_when_credentials_are_fetched(earthdata, env, logs):
    bad = "edl-token-that-was-revoked-77aa"
    env.setenv("EARTHDATA_TOKEN", bad)
    with pytest.raises(CredentialsError, match="refused S3 credentials") as info:
        nsidc_credentials(retry=FakeTime().policy())
    assert bad not in str(info.value) and bad not in logs.text
    assert earthdata.s3credentials_url in str(info.value)
    assert "(HTTP 401; not retried)" in str(info.value)
    assert earthdata.s3credentials_requests == 1


def test_no_credentials_configured(env):
    with pytest.raises(CredentialsError) as info:
        earthdata_login()
    message = str(info.value)
    assert "no Earthdata credentials configured" in message
    assert "EARTHDATA_TOKEN" in message and "netrc" in message


def test_half_configured_environment_is_named(env):
    env.setenv("EARTHDATA_USERNAME", USER)
    with pytest.raises(CredentialsError, match="EARTHDATA_USERNAME is set without its partner"):
        earthdata_login()


class Clock:
    def __init__(self):
        self.now = datetime.now(UTC)

    def __call__(self):
        return self.now


def test_refresh_happens_exactly_inside_the_margin(earthdata, env, logs):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    clock = Clock()
    creds = nsidc_credentials(clock=clock)
    first = creds.current
    fetched = len(earthdata.issued)

    clock.now = first.expiration - DEFAULT_MARGIN - timedelta(seconds=1)
    assert creds.refresh_if_needed() is first
    clock.now = first.expiration - DEFAULT_MARGIN  # exactly the margin left: still enough
    assert creds.refresh_if_needed() is first
    assert len(earthdata.issued) == fetched

    clock.now = first.expiration - DEFAULT_MARGIN + timedelta(microseconds=1)
    second = creds.refresh_if_needed()
    assert len(earthdata.issued) == fetched + 1
    assert second.access_key_id != first.access_key_id
    assert creds.current is second
    assert_no_secrets(earthdata, logs.text, repr(creds))


def test_short_lived_credentials_are_refreshed_in_real_time(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    earthdata.lifetime_s = 3.0
    margin = timedelta(seconds=1.5)
    creds = nsidc_credentials()
    first = creds.current
    if creds.remaining() >= margin:  # fresh: nothing to do yet
        assert creds.refresh_if_needed(margin) is first
    time.sleep(max(0.0, (creds.remaining() - margin).total_seconds()) + 0.05)
    second = creds.refresh_if_needed(margin)
    assert second is not first and second.access_key_id == earthdata.issued[-1].access_key_id
    assert creds.remaining() > margin


def test_concurrent_refresh_fetches_once(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    clock = Clock()
    creds = nsidc_credentials(clock=clock)
    fetched = len(earthdata.issued)
    clock.now = creds.expiration - timedelta(minutes=1)
    earthdata.lifetime_s = 7200.0  # the next keys outlive the moved clock by an hour
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: creds.refresh_if_needed(), range(16)))
    assert len(earthdata.issued) == fetched + 1
    assert len({r.access_key_id for r in results}) == 1


def test_aws_credentials_from_the_environment_read_moto(s3_env, monkeypatch):
    creds = aws_credentials()
    assert creds.current.access_key_id == s3_env.credentials.access_key_id
    assert creds.expiration is None and creds.remaining() is None
    assert creds.refresh_if_needed() is creds.current  # static keys: nothing to refresh
    bucket = s3_env.create_bucket("magg-credentials-test")
    s3_env.client.put_object(Bucket=bucket, Key="hello.txt", Body=b"hi")
    store = s3_store(bucket, credentials=creds.current, endpoint=s3_env.endpoint)
    assert [o["path"] for o in obstore.list(store).collect()] == ["hello.txt"]
    text = repr(creds) + str(creds)
    assert s3_env.credentials.secret_access_key not in text


def test_missing_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe the metadata address
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    with pytest.raises(CredentialsError, match="no AWS credentials found"):
        aws_credentials()
    with pytest.raises(CredentialsError, match="AWS profile 'nope' not found"):
        aws_credentials("nope")


def test_credentials_wrap_any_source():
    class Static:
        description = "static test keys"

        def __init__(self):
            self.calls = 0

        def fetch(self):
            self.calls += 1
            return S3Credentials(
                "AKIA1234", "s3cr3t-value", None, datetime.now(UTC) + timedelta(minutes=5)
            )

    source = Static()
    creds = Credentials(source)
    assert source.calls == 1
    creds.refresh_if_needed()  # 5 min left < 15 min margin
    assert source.calls == 2
    creds.refresh_if_needed(timedelta(minutes=1))
    assert source.calls == 2
    creds.reject(creds.current)  # S3 refused them with 5 minutes left
    creds.refresh_if_needed(timedelta(minutes=1))
    assert source.calls == 3
    assert "s3cr3t-value" not in repr(creds)


# --- momentary failures of s3credentials --------------------------------------------


class FakeTime:
    """A monotonic clock that moves only when the retry sleeps, so backoff costs no time."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self):
        return self.now

    def policy(self, **overrides):
        """A policy on this clock; a short read timeout so a stalled answer costs 0.3 s."""
        return RetryPolicy(
            sleep=self.sleep, monotonic=self.monotonic, read_timeout_s=0.3, **overrides
        )


ALL_FIELDS = "accessKeyId, secretAccessKey, sessionToken, expiration"
MOMENTARY = [
    # (fake failure kind, HTTP status, how the error describes one such attempt)
    ("status", 503, "HTTP 503 with an HTML page"),
    ("status", 502, "HTTP 502 with an HTML page"),
    ("status", 429, "HTTP 429 with an HTML page"),
    ("maintenance_page", 200, "HTTP 200 with an HTML page"),
    ("login_page", 200, "HTTP 200 from {edl_host} (redirected) with an HTML page"),
    ("json_without_keys", 200, f"HTTP 200 with JSON without {ALL_FIELDS}"),
    ("not_json", 200, "HTTP 200 with a body that is not JSON"),
    ("drop", 0, "connection failed (ConnectionError)"),
    ("reset", 0, "connection failed (ConnectionError)"),
    ("stall", 0, "no answer in time (ReadTimeout; connect 5s, read 0.3s)"),
    ("truncated", 0, "connection failed (ChunkedEncodingError)"),
]
MOMENTARY_IDS = [f"{kind}-{status}" if kind == "status" else kind for kind, status, _ in MOMENTARY]


@pytest.mark.parametrize(("kind", "status", "described"), MOMENTARY, ids=MOMENTARY_IDS)
def test_momentary_failures_are_retried_with_backoff(earthdata, env, logs, kind, status, described):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    fake_time = FakeTime()
    earthdata.fail_next(2, kind, status)
    creds = nsidc_credentials(retry=fake_time.policy())
    assert earthdata.s3credentials_requests == 3
    assert fake_time.sleeps == [1.0, 2.0]
    assert creds.current.access_key_id == earthdata.issued[-1].access_key_id
    described = described.format(edl_host=earthdata.host)
    assert logs.text.count(described) == 2  # one warning per failed attempt
    assert "(attempt 2 of 5); retrying in 2.0s" in logs.text
    assert_no_secrets(earthdata, logs.text)


@pytest.mark.parametrize(("kind", "status", "described"), MOMENTARY, ids=MOMENTARY_IDS)
def test_exhausted_retries_name_status_url_and_body_kind(
    earthdata, env, logs, kind, status, described
):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    fake_time = FakeTime()
    earthdata.fail_next(3, kind, status)
    started = time.monotonic()
    with pytest.raises(CredentialsError) as info:
        nsidc_credentials(retry=fake_time.policy(attempts=3))
    wall_s = time.monotonic() - started
    described = described.format(edl_host=earthdata.host)
    assert str(info.value) == (
        f"no S3 credentials from {earthdata.s3credentials_url} after 3 attempt(s) in 3.0s: "
        f"{described}; {described}; {described}"
    )
    assert earthdata.s3credentials_requests == 3
    assert fake_time.sleeps == [1.0, 2.0]
    assert info.value.__cause__ is None and info.value.__context__ is None  # no request chained
    assert wall_s < 3.0  # a stalled answer costs the read timeout, not the fake's 2 s stall
    # the failure pages repeat the bearer token: no part of a body reaches the error or the log
    assert_no_secrets(earthdata, str(info.value), logs.text)
    assert "Bearer" not in str(info.value) + logs.text
    assert "maintenance" not in str(info.value) and "rotated" not in str(info.value)


def test_mixed_failures_then_success_within_the_default_attempts(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    fake_time = FakeTime()
    earthdata.fail_next(1, "status", 500)
    earthdata.fail_next(1, "maintenance_page")
    earthdata.fail_next(1, "reset")
    earthdata.fail_next(1, "stall")
    creds = nsidc_credentials(retry=fake_time.policy())
    assert earthdata.s3credentials_requests == 5
    assert fake_time.sleeps == [1.0, 2.0, 4.0, 8.0]  # 15 s of the default 60 s budget
    assert creds.current.access_key_id == earthdata.issued[-1].access_key_id


def test_password_and_token_never_appear_in_the_error_or_logs(earthdata, env, logs):
    env.setenv("EARTHDATA_USERNAME", USER)
    env.setenv("EARTHDATA_PASSWORD", PASSWORD)
    for kind in ("maintenance_page", "login_page", "json_without_keys", "not_json", "status"):
        earthdata.fail_next(1, kind)
    with pytest.raises(CredentialsError) as info:
        nsidc_credentials(retry=FakeTime().policy())
    message = str(info.value)
    assert "after 5 attempt(s)" in message and earthdata.s3credentials_url in message
    # the login page was fetched from Earthdata with Basic auth, which the page repeats
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for text in (message, logs.text):
        assert PASSWORD not in text and basic not in text and "Bearer" not in text
    assert_no_secrets(earthdata, message, logs.text)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_login_is_not_retried(earthdata, env, status):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    fake_time = FakeTime()
    earthdata.fail_next(1, "status", status)
    with pytest.raises(CredentialsError) as info:
        nsidc_credentials(retry=fake_time.policy())
    assert earthdata.s3credentials_requests == 1 and fake_time.sleeps == []
    assert str(info.value).startswith(
        f"{earthdata.s3credentials_url} refused S3 credentials (HTTP {status}; not retried): "
        "the Earthdata login was not accepted"
    )


def test_wrong_url_is_not_retried(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    fake_time = FakeTime()
    wrong = earthdata.s3credentials_url.replace("/s3credentials", "/s3-credentials")
    with pytest.raises(CredentialsError) as info:
        nsidc_credentials(s3credentials_url=wrong, retry=fake_time.policy())
    assert (
        str(info.value) == f"{wrong} answered HTTP 404 with JSON without {ALL_FIELDS}; not retried"
    )
    assert fake_time.sleeps == []


def test_plain_http_url_is_refused_before_the_token_is_sent(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    plain = earthdata.s3credentials_url.replace("https://", "http://")
    with pytest.raises(CredentialsError, match=f"URL '{plain}' is not https"):
        nsidc_credentials(s3credentials_url=plain)
    assert earthdata.s3credentials_requests == 0


def test_retries_stop_at_the_total_time_budget(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    fake_time = FakeTime()
    earthdata.fail_next(10, "status")
    policy = fake_time.policy(attempts=10, max_delay_s=100.0, total_s=10.0)
    with pytest.raises(CredentialsError, match=r"after 4 attempt\(s\) in 7\.0s"):
        nsidc_credentials(retry=policy)
    assert fake_time.sleeps == [1.0, 2.0, 4.0]  # waiting 8 s more would pass 10 s
    assert earthdata.s3credentials_requests == 4


def test_backoff_is_capped_at_the_longest_delay():
    policy = RetryPolicy(attempts=6, first_delay_s=0.5, max_delay_s=2.0, total_s=100.0)
    assert [policy.delay_after(n, 0.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 2.0, 2.0, None]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("attempts", 0, "RetryPolicy.attempts must be at least 1, got 0"),
        ("first_delay_s", -1.0, "RetryPolicy.first_delay_s must not be negative, got -1.0"),
        ("read_timeout_s", 0.0, "RetryPolicy.read_timeout_s must be positive, got 0.0"),
    ],
)
def test_bad_retry_policy_names_the_field(field, value, message):
    with pytest.raises(ValueError) as info:
        RetryPolicy(**{field: value})
    assert str(info.value) == message


# --- credentials that S3 rejected ----------------------------------------------------


def test_rejected_credentials_are_replaced_at_the_next_refresh(earthdata, env, logs):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    creds = nsidc_credentials()
    first = creds.current
    assert creds.remaining() > DEFAULT_MARGIN  # nothing but the rejection calls for new ones
    creds.reject(first)
    assert earthdata.s3credentials_requests == 1  # reject itself fetches nothing
    second = creds.refresh_if_needed()
    assert earthdata.s3credentials_requests == 2
    assert second.access_key_id == earthdata.issued[-1].access_key_id != first.access_key_id
    assert creds.refresh_if_needed() is second
    assert earthdata.s3credentials_requests == 2
    assert f"S3 rejected credentials {first.access_key_id[:4]}…" in logs.text
    assert_no_secrets(earthdata, logs.text)


@pytest.mark.parametrize("threads", [2, 8])
def test_cells_rejecting_the_same_credentials_together_cause_one_fetch(earthdata, env, threads):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    creds = nsidc_credentials()
    first = creds.current
    together = threading.Barrier(threads)

    def cell(_):
        together.wait()
        creds.reject(first)
        return creds.refresh_if_needed()

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(cell, range(threads)))
    assert earthdata.s3credentials_requests == 2
    assert {r.access_key_id for r in results} == {earthdata.issued[-1].access_key_id}


def test_rejecting_replaced_credentials_changes_nothing(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    creds = nsidc_credentials()
    first = creds.current
    creds.reject(first)
    second = creds.refresh_if_needed()
    creds.reject(first)  # a slower cell reports the old credentials
    assert creds.refresh_if_needed() is second
    assert earthdata.s3credentials_requests == 2


def test_credentials_back_from_a_lambda_event_are_matched(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    creds = nsidc_credentials()
    from_event = S3Credentials.from_event(creds.current.to_event())  # no expiry in that form
    creds.reject(from_event)
    assert creds.refresh_if_needed().access_key_id != from_event.access_key_id
    assert earthdata.s3credentials_requests == 2


def test_a_rejection_stands_until_new_credentials_are_had(earthdata, env):
    env.setenv("EARTHDATA_TOKEN", USER_TOKEN)
    creds = nsidc_credentials(retry=FakeTime().policy(attempts=2))
    first = creds.current
    creds.reject(first)
    earthdata.fail_next(2, "status")
    with pytest.raises(CredentialsError, match="HTTP 503"):
        creds.refresh_if_needed()
    assert creds.current is first
    second = creds.refresh_if_needed()  # tries again though the clock says first is still good
    assert second.access_key_id == earthdata.issued[-1].access_key_id != first.access_key_id
    assert earthdata.s3credentials_requests == 4
