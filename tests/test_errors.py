"""Which failures are retried: transient ones only."""

from __future__ import annotations

from dataclasses import replace

import botocore.exceptions
import pytest

from magg_core.catalog import catalog_from_records
from magg_core.cell import process_cell
from magg_core.config import load_config
from magg_core.errors import (
    CredentialsRejectedError,
    TransientReadError,
    is_transient,
    rejects_credentials,
)
from magg_core.plan import plan_cells
from magg_core.s3 import S3Credentials, S3Endpoint
from magg_core.sample import write_sample
from magg_core.store import create_template, open_store, read_records


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (client_error("SlowDown", 503), True),
        (client_error("TooManyRequestsException", 429), True),
        (client_error("InternalError", 500), True),
        (client_error("ExpiredToken", 400), True),
        (client_error("AccessDenied", 403), False),
        (CredentialsRejectedError("InvalidToken"), True),
        (client_error("NoSuchKey", 404), False),
        (ValueError("bad config"), False),
        (KeyError("h_li"), False),
    ],
)
def test_classification(exc, expected):
    assert is_transient(exc) is expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (client_error("ExpiredToken", 400), True),
        (client_error("InvalidToken", 400), True),
        (client_error("TokenRefreshRequired", 400), True),
        (client_error("InvalidAccessKeyId", 403), True),
        (client_error("AccessDenied", 403), True),  # the run was granted NSIDC's bucket
        (client_error("AccessDeniedException", 403), False),  # Lambda's IAM refusal
        (client_error("NoSuchKey", 404), False),
        (client_error("SlowDown", 503), False),
        (client_error("400", 400), True),  # botocore's code for a bare HEAD refusal
        (client_error("404", 404), False),
        (ConnectionResetError(), False),
    ],
)
def test_credential_rejections_are_told_apart(exc, expected):
    assert rejects_credentials(exc) is expected


def test_an_unreachable_s3_endpoint_fails_the_cell_without_writing(tmp_path):
    """Nothing listens on port 9: the read error says nothing about the granule."""
    granules = write_sample(tmp_path / "granules", n_granules=2)
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    config = load_config()
    url = str(tmp_path / "out.zarr")
    store = open_store(url)
    create_template(store, config, catalog.parents, {})
    request = plan_cells(catalog, config, url, granule_mirror="s3://nowhere/ATL06")[0]
    request = replace(request, s3_credentials=S3Credentials("AKIAEXAMPLE", "not-a-secret"))

    with pytest.raises(TransientReadError) as caught:
        process_cell(request, endpoint=S3Endpoint("http://127.0.0.1:9", "us-west-2"))

    assert is_transient(caught.value)
    assert read_records(store, config) == {}
