"""Earthdata login and NSIDC S3 credentials through earthaccess, against an HTTPS fake."""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import obstore
import pytest

from magg_core.credentials import (
    DEFAULT_MARGIN,
    Credentials,
    CredentialsError,
    aws_credentials,
    earthdata_login,
    nsidc_credentials,
)
from magg_core.s3 import S3Credentials, s3_store
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
        nsidc_credentials()
    assert bad not in str(info.value) and bad not in logs.text
    assert earthdata.s3credentials_url in str(info.value)


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
    assert "s3cr3t-value" not in repr(creds)
