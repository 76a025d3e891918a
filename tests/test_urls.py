"""Untrusted URLs: which granules and stores a cell event may name (pure: no I/O).

The Lambda handler and the ECS child run go through these checks; the
handler end to end is in ``tests/deployments/test_lambda.py``, the ECS child here.
"""

from __future__ import annotations

import pytest

from magg_core.access.s3 import S3Endpoint
from magg_core.granules.h5driver import ObstoreDriver, S3Access
from magg_core.schema import ECS, CellRequest, RequestError
from magg_core.store.arrays import open_store
from magg_core.store.records import input_fingerprint
from magg_core.urls import (
    URLError,
    allowed_store,
    granule_name,
    granule_url,
    parse_allowed_stores,
    parse_s3_url,
)

KEY = "ATLAS/ATL06/007/2018/10/14/ATL06_20181014103720_02410111_007_01.h5"
S3 = f"s3://nsidc-cumulus-prod-protected/{KEY}"
HTTPS = f"https://data.nsidc.earthdatacloud.nasa.gov/nsidc-cumulus-prod-protected/{KEY}"


def event(**changes) -> dict:
    base = {
        "parent_morton": "11579880541876387846",
        "parent_order": 6,
        "child_order": 12,
        "granule_urls": [S3],
        "store_path": "s3://out/atl06/c22.zarr",
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    "url",
    [S3, HTTPS, "S3://nsidc-cumulus-prod-protected/" + KEY, HTTPS.replace("data.", "DATA.")],
    ids=["s3", "nsidc-https", "S3-scheme", "host-case"],
)
def test_every_spelling_of_an_nsidc_object_becomes_its_s3_url(url):
    assert granule_url(url) == S3
    assert CellRequest.from_event(event(granule_urls=[url]), ECS).granule_urls == (S3,)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/etc/passwd", "scheme '' (a local path) is not accepted"),
        ("granules/x.h5", "scheme '' (a local path) is not accepted"),
        ("file:///etc/passwd", "scheme 'file' (a local file) is not accepted"),
        ("FILE:///etc/passwd", "scheme 'file' (a local file) is not accepted"),
        ("http://data.nsidc.earthdatacloud.nasa.gov/b/k.h5", "scheme 'http' is not accepted"),
        ("https://evil.example/x.h5", "host 'evil.example' is not accepted"),
        (HTTPS.replace(".gov/", ".gov:8443/"), "host 'data.nsidc.earthdatacloud.nasa.gov:8443'"),
        (HTTPS.replace("ATL06_", "%2e%2e/ATL06_"), "percent-encoded"),
        ("s3:/x", "s3 URL has no bucket"),
        ("s3:///key.h5", "s3 URL has no bucket"),
        ("s3://user@bucket/key.h5", "'user@bucket' is not a valid S3 bucket name"),
        ("s3://bucket:9000/key.h5", "is not a valid S3 bucket name"),
        ("s3://Bucket/key.h5", "is not a valid S3 bucket name"),
        ("s3://bucket/key.h5?versionId=1", "query or fragment"),
        ("s3://bucket/key.h5#x", "query or fragment"),
        ("s3://bucket/a/../../x.h5", "'..' climbs above the bucket"),
        ("s3://bucket/", "names no object"),
        ("s3://bucket/key\n.h5", "control characters"),
        ("s3://[bucket/key.h5", "not a URL"),
        ("", "empty granule URL"),
        ("   ", "empty granule URL"),
    ],
)
def test_anything_but_an_s3_object_is_refused_and_named(url, message):
    with pytest.raises(URLError) as caught:
        granule_url(url)
    assert message in str(caught.value)


def test_an_event_names_each_bad_granule_by_index_and_says_no_more_than_a_few():
    urls = [S3, "/proc/self/environ", "file:///etc/passwd", S3, *["ftp://h/x"] * 5]
    with pytest.raises(RequestError) as caught:
        CellRequest.from_event(event(granule_urls=urls, parent_order="six"), ECS)
    message = str(caught.value)
    assert "parent_order must be an integer" in message  # other problems still reported
    assert "granule_urls[1]: scheme '' (a local path)" in message
    assert "granule_urls[2]: scheme 'file' (a local file)" in message
    assert "granule_urls[4]: scheme 'ftp'" in message
    assert "granule_urls[5]" not in message and "and 4 more bad granule URL(s)" in message
    assert "environ" not in message and "passwd" not in message  # the URL is not echoed


def test_dot_segments_resolve_inside_the_bucket():
    assert granule_url("s3://bucket/a/./b/../k.h5") == "s3://bucket/a/k.h5"
    assert granule_url("s3://bucket//a//k.h5") == "s3://bucket/a/k.h5"


# -- the Lambda store allow-list ----------------------------------------------------------

ALLOWED = "s3://out/atl06, s3://other-out/"


@pytest.mark.parametrize(
    ("store", "normalised"),
    [
        ("s3://out/atl06/c22.zarr", "s3://out/atl06/c22.zarr"),
        ("s3://out/atl06/deep/er/c22.zarr/", "s3://out/atl06/deep/er/c22.zarr"),
        ("S3://out/atl06/./c22.zarr", "s3://out/atl06/c22.zarr"),
        ("s3://out/atl06/x/../c22.zarr", "s3://out/atl06/c22.zarr"),
        ("s3://other-out/anything.zarr", "s3://other-out/anything.zarr"),
    ],
)
def test_a_store_below_an_allowed_prefix_is_allowed_in_normal_form(store, normalised):
    assert allowed_store(store, ALLOWED) == normalised


@pytest.mark.parametrize(
    "store",
    [
        "s3://out/atl06-old/c22.zarr",  # a string prefix, not a path prefix
        "s3://out/atl06/../secret.zarr",
        "s3://out-evil/atl06/c22.zarr",
        "s3://other-out-evil/c22.zarr",
        "s3://out/c22.zarr",
    ],
)
def test_a_store_outside_every_allowed_prefix_is_refused(store):
    with pytest.raises(URLError, match="is not below a prefix allowed by MAGG_ALLOWED_STORES"):
        allowed_store(store, ALLOWED)


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("/tmp/store.zarr", "scheme '' is not s3"),
        ("file:///tmp/store.zarr", "scheme 'file' is not s3"),
        ("s3://out/atl06/c22.zarr?x=1", "query or fragment"),
        ("s3://out/../../etc", "'..' climbs above the bucket"),
    ],
)
def test_a_store_that_is_not_an_s3_url_is_refused_naming_it(store, message):
    with pytest.raises(URLError) as caught:
        allowed_store(store, ALLOWED)
    assert str(caught.value).startswith("store_path ") and message in str(caught.value)


@pytest.mark.parametrize("value", [None, "", " , "])
def test_without_an_allow_list_every_store_is_refused(value):
    with pytest.raises(URLError, match="^MAGG_ALLOWED_STORES is not set"):
        allowed_store("s3://out/atl06/c22.zarr", value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("s3://out/atl06,/tmp", "entry '/tmp': scheme '' is not s3"),
        ("s3://Out/atl06", "'Out' is not a valid S3 bucket name"),
        ("s3://out/atl06,https://out/x", "entry 'https://out/x': scheme 'https' is not s3"),
    ],
)
def test_a_malformed_allow_list_names_the_variable_and_entry(value, message):
    with pytest.raises(URLError, match="MAGG_ALLOWED_STORES") as caught:
        parse_allowed_stores(value)
    assert message in str(caught.value)


# -- the ECS child run receives its request as flow parameters -------------------------


def test_an_ecs_child_run_refuses_a_local_granule_before_reading(prefect_server, tmp_path):
    from magg.flows.process_cell import process_cell_flow

    granule = tmp_path / "granule.h5"
    granule.write_bytes(b"\x89HDF\r\n\x1a\n")
    request = event(granule_urls=[str(granule)], store_path=str(tmp_path / "store.zarr"))

    state = process_cell_flow(request, return_state=True)

    assert state.is_failed()
    assert "granule_urls[0]: scheme '' (a local path) is not accepted" in state.message
    assert not (tmp_path / "store.zarr").exists()


def test_an_ecs_child_run_refuses_one_granule_twice_before_reading(prefect_server, tmp_path):
    """Another spelling of the same object is the same granule: it would count twice."""
    from magg.flows.process_cell import process_cell_flow

    twice = S3.replace("/ATLAS/", "//ATLAS/")
    request = event(granule_urls=[S3, twice], store_path=str(tmp_path / "store.zarr"))

    state = process_cell_flow(request, return_state=True)

    assert state.is_failed()
    assert "granule_urls[1] is granule" in state.message and "(granule_urls[0])" in state.message
    assert not (tmp_path / "store.zarr").exists()


# -- one S3 URL parser, one granule-name parser ------------------------------------------
# The lax parser that opened stores and granules (``magg_core.access.s3.split_s3_url``) took
# any netloc as the bucket, dropped a query, kept ``..`` and empty segments in the key.


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://Not_A_Bucket/store.zarr", "is not a valid S3 bucket name"),
        ("s3://bucket:9000/store.zarr", "is not a valid S3 bucket name"),
        ("s3://user@bucket/store.zarr", "is not a valid S3 bucket name"),
        ("s3://bucket/store.zarr?versionId=3", "query or fragment"),
        ("s3://bucket/../other/store.zarr", "climbs above the bucket"),
        ("s3:///store.zarr", "has no bucket"),
    ],
)
def test_stores_and_granules_open_only_what_the_strict_parser_accepts(url, message):
    with pytest.raises(URLError, match=message) as caught:
        open_store(url, endpoint=S3Endpoint(url="http://127.0.0.1:9", region="us-west-2"))
    assert str(caught.value).startswith(f"store URL {url!r}: ")
    with pytest.raises(URLError, match=message) as caught:
        ObstoreDriver(url, S3Access(None, S3Endpoint(url="http://127.0.0.1:9")))
    assert str(caught.value).startswith(f"granule URL {url!r}: ")


def test_the_key_the_strict_parser_gives_is_normalised():
    # The lax parser kept "a//b/./c" as the key; S3 would have looked for that literal key.
    location = parse_s3_url("S3://bucket//a//b/./c.h5")
    assert (location.bucket, location.key) == ("bucket", "a/b/c.h5")
    assert parse_s3_url("s3://bucket").key == ""


NAME = "ATL06_20181014103720_02410111_007_01.h5"


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (
            "s3://b/ATL06/007/ATL06_20181014103720_02410111_007_01.h5",
            "ATL06_20181014103720_02410111_007_01.h5",
        ),
        ("https://data.nsidc.earthdatacloud.nasa.gov/b/k/x.h5", "x.h5"),
        ("file:///mirror/a%20b.h5", "a%20b.h5"),
        ("/mirror/x.h5", "x.h5"),
        ("x.h5", "x.h5"),
    ],
)
def test_the_granule_name_is_the_last_segment(url, name):
    assert granule_name(url) == name


@pytest.mark.parametrize("url", ["", "s3://b/ATL06/", "/mirror/"])
def test_a_url_naming_no_file_is_refused_quoting_it(url):
    # The copies this replaced stripped a trailing "/" (so "…/x.h5/" was "x.h5"),
    # or returned "" (the catalog's), which matched nothing.
    with pytest.raises(URLError, match="names no file") as caught:
        granule_name(url)
    assert repr(url) in str(caught.value)


def test_the_input_fingerprint_uses_the_one_granule_name():
    a = input_fingerprint(["s3://b/x/ATL06_1.h5", "/m/ATL06_2.h5"], "cfg", "0")
    b = input_fingerprint(["file:///elsewhere/ATL06_2.h5", "s3://c/ATL06_1.h5"], "cfg", "0")
    assert a == b
    with pytest.raises(URLError):
        input_fingerprint(["s3://b/x/ATL06_1.h5/"], "cfg", "0")
