"""A failed read names its real cause: the credentials, the network, the format, or the file.

Real granules (``tests/data/realdata``) in moto S3, read through a loopback
proxy that can refuse a ``HEAD`` with a bare 400 (as S3 refuses an expired
token there) or cut an answer short; and valid HDF5 files in structures
h5coro does not parse, which must read "unsupported", never "corrupt".
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from magg.flows.extract_granule import extract_granule_flow
from magg.tasks.ecs import CREDENTIALS_REJECTED, raise_if_child_failed
from magg_core.access.s3 import S3Endpoint
from magg_core.errors import CredentialsRejectedError, TransientReadError, is_transient
from magg_core.granules.h5driver import SHORT_READ_ATTEMPTS
from magg_core.granules.read import GranuleReadError, read_granules, read_parents
from magg_core.schema import ExtractRequest
from tests import oracle
from tests.conftest import running_moto
from tests.flow_support import S3Error, s3_proxy
from tests.test_realdata import CONFIG, THWAITES, mirror_name, parents_of

BUCKET = "magg-causes"
NAME = mirror_name(THWAITES)


@pytest.fixture(scope="module")
def moto_server():
    """This module's own moto server: its proxies cut answers mid-body, and a server left
    with such connections must not be the one other modules' S3 tests read from."""
    with running_moto() as server:
        yield server


@pytest.fixture(scope="module")
def in_s3(moto_server):
    moto_server.create_bucket(BUCKET)
    moto_server.client.upload_file(str(THWAITES), BUCKET, f"whole/{NAME}")
    cut = THWAITES.read_bytes()[: THWAITES.stat().st_size // 2]
    moto_server.client.put_object(Bucket=BUCKET, Key=f"truncated/{NAME}", Body=cut)
    return f"s3://{BUCKET}/whole/{NAME}"


@pytest.fixture
def proxy(moto_server):
    with s3_proxy(moto_server.url) as proxy:
        proxy.endpoint = S3Endpoint(url=proxy.url, region=moto_server.endpoint.region)
        yield proxy


def read_through(proxy, moto_server, url):
    """The production read of one cell's granules: failures sorted into the granule's
    (returned) and the work's (raised, for a retry)."""
    parent = parents_of([THWAITES])[0]
    return read_granules(
        [url], parent, CONFIG, credentials=moto_server.credentials, endpoint=proxy.endpoint
    )


def expected_points(parent: int) -> int:
    return len(oracle.points_in_parent(oracle.good_points([THWAITES]), parent))


# -- credentials refused on a HEAD --------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403])
def test_a_bare_head_refusal_is_a_credential_rejection(in_s3, proxy, moto_server, status):
    proxy.fault = lambda method, *_: S3Error(status, None, "") if method == "HEAD" else None
    with pytest.raises(CredentialsRejectedError) as caught:
        read_through(proxy, moto_server, in_s3)
    assert is_transient(caught.value)
    heads = [c for c in proxy.calls if c.method == "HEAD"]
    assert heads and all(c.status == status for c in heads)
    for secret in moto_server.credentials.secrets():
        assert secret not in str(caught.value)


def test_a_head_answering_not_found_is_the_granules_failure(in_s3, proxy, moto_server):
    """The contrast: 404 names the object, not the credentials."""
    proxy.fault = lambda method, *_: S3Error(404, None, "") if method == "HEAD" else None
    points, failures = read_through(proxy, moto_server, in_s3)
    assert points == [] and [f.url for f in failures] == [in_s3]


# -- short answers from an intact object -------------------------------------------------------


def test_one_short_answer_is_read_again(in_s3, proxy, moto_server):
    cut = []

    def once(method, bucket, key):
        big = method == "GET" and not cut
        if big:
            cut.append(key)
        return big

    proxy.cut = once
    points, failures = read_through(proxy, moto_server, in_s3)
    assert cut and failures == []
    assert len(points[0]) == expected_points(parents_of([THWAITES])[0]) > 0


def test_an_object_answering_short_every_time_is_a_transient_error_not_truncation(
    in_s3, proxy, moto_server
):
    proxy.cut = lambda method, bucket, key: method == "GET"
    with pytest.raises(TransientReadError) as caught:
        read_through(proxy, moto_server, in_s3)
    assert is_transient(caught.value)
    assert "truncated" not in str(caught.value) and "corrupt" not in str(caught.value)
    assert f"{SHORT_READ_ATTEMPTS} times" in str(caught.value)
    gets = [c for c in proxy.calls if c.method == "GET"]
    assert len(gets) == SHORT_READ_ATTEMPTS  # the first read, tried again, then given up


def test_an_object_that_is_truly_short_is_still_truncated(in_s3, proxy, moto_server):
    url = f"s3://{BUCKET}/truncated/{NAME}"
    points, failures = read_through(proxy, moto_server, url)
    assert points == [] and len(failures) == 1
    assert "truncated" in failures[0].reason


# -- valid files h5coro does not parse ----------------------------------------------------------


def with_soft_linked_beams(path):
    """The real granule's beams moved to ``/data/<beam>``, each ``<beam>/land_ice_segments``
    a soft link there: valid HDF5, a structure h5coro does not follow."""
    with h5py.File(THWAITES, "r") as src, h5py.File(path, "w") as out:
        out.attrs["short_name"] = np.bytes_(b"ATL06")
        for beam in oracle.BEAMS:
            src.copy(src[f"{beam}/land_ice_segments"], out, f"data/{beam}")
            out[f"{beam}/land_ice_segments"] = h5py.SoftLink(f"/data/{beam}")
    return path


def test_a_soft_linked_beam_is_unsupported_naming_the_link_not_corrupt(tmp_path):
    path = with_soft_linked_beams(tmp_path / NAME)
    with h5py.File(path, "r") as f:  # HDF5 itself reads it: the file is valid
        assert f["gt1l/land_ice_segments/h_li"].shape == (60,)
    with pytest.raises(GranuleReadError) as caught:
        read_parents(str(path), parents_of([THWAITES]), CONFIG)
    assert caught.value.reason == (
        "cannot read coordinates: unsupported format (gt1l/land_ice_segments/latitude: "
        "a soft link at gt1l/land_ice_segments, which HDF5 reads but h5coro does not)"
    )


def test_a_user_block_is_unsupported_not_not_hdf5(tmp_path, in_s3, moto_server):
    """HDF5 finds its signature after a user block (512, 1024, … bytes); h5coro does not."""
    path = tmp_path / NAME
    with h5py.File(path, "w", userblock_size=1024) as out, h5py.File(THWAITES, "r") as src:
        for name in src:
            src.copy(src[name], out, name)
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 1024
    moto_server.client.upload_file(str(path), BUCKET, f"userblock/{NAME}")
    for url, access in (
        (str(path), {}),
        (
            f"s3://{BUCKET}/userblock/{NAME}",
            {"credentials": moto_server.credentials, "endpoint": moto_server.endpoint},
        ),
    ):
        with pytest.raises(GranuleReadError) as caught:
            read_parents(url, parents_of([THWAITES]), CONFIG, **access)
        assert caught.value.reason == (
            "cannot open: unsupported format (a user block of 1024 bytes before the superblock)"
        )


# -- the ECS child flow run tells its parent by its state's name --------------------------------


@pytest.mark.parametrize("status", [400, 403])
def test_an_ecs_extract_whose_credentials_s3_refused_ends_in_a_named_state(
    in_s3, proxy, moto_server, prefect_server, monkeypatch, status
):
    """Ambient credentials (none in the flow's parameters); S3 refuses them on a HEAD."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    monkeypatch.setenv("AWS_REGION", moto_server.endpoint.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.credentials.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.credentials.secret_access_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    proxy.fault = lambda method, bucket, key, _: (
        S3Error(status, None, "") if method == "HEAD" and key.endswith(NAME) else None
    )
    request = ExtractRequest(
        granule_url=in_s3,
        parents=tuple(parents_of([THWAITES])),
        store_path=f"s3://{BUCKET}/ecs-{status}.zarr",
        parent_order=6,
        child_order=12,
    )
    state = extract_granule_flow(request.to_event(), return_state=True)
    assert state.is_failed() and state.name == CREDENTIALS_REJECTED
    with pytest.raises(CredentialsRejectedError):
        raise_if_child_failed(state, f"granule {request.name}")

    proxy.fault = None  # the same child with credentials S3 takes: the extract is done
    state = extract_granule_flow(request.to_event(), return_state=True)
    assert state.is_completed() and state.result()["status"] == "ok"
    raise_if_child_failed(state, f"granule {request.name}")  # nothing to raise
