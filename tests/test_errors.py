"""Which failures are retried: transient ones only."""

from __future__ import annotations

import pickle
from dataclasses import replace

import botocore.exceptions
import obstore.exceptions as obstore_errors
import pytest

from deployments.aws.lambda_client import LambdaInvokeError
from magg.tasks.ecs import FAILED_STATE_NAMES, failed_state, raise_if_child_failed
from magg_core.access.s3 import S3Credentials, S3Endpoint
from magg_core.catalog.catalog import catalog_from_records
from magg_core.config import ConfigError, load_config
from magg_core.errors import (
    CellFailedError,
    CellTimeoutError,
    CredentialsRejectedError,
    InputError,
    MaggError,
    PermanentError,
    TransientError,
    TransientReadError,
    error_from_kind,
    error_kind,
    is_transient,
    rejects_credentials,
    s3_answer,
)
from magg_core.granules.h5driver import TruncatedFileError
from magg_core.granules.sample import write_sample
from magg_core.grid.cell import process_cell
from magg_core.grid.plan import plan_cells
from magg_core.store.arrays import TemplateMismatchError, create_template, open_store
from magg_core.store.records import read_records


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


# -- one root, three branches -----------------------------------------------------------


def _magg_exception_classes() -> list[type[BaseException]]:
    import importlib
    import inspect
    import pkgutil

    import magg_core

    found = []
    modules = [m.name for m in pkgutil.walk_packages(magg_core.__path__, prefix="magg_core.")]
    for name in [*modules, "deployments.aws.lambda_client"]:  # the client raises ours too
        namespace = vars(importlib.import_module(name))
        found += [
            cls
            for cls in namespace.values()
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == name
        ]
    assert len({cls.__module__ for cls in found}) > 10  # the walk reached the subpackages
    return found


BRANCHES = (InputError, TransientError, PermanentError)


def test_every_exception_of_magg_core_has_the_root_and_one_branch():
    classes = _magg_exception_classes()
    assert len(classes) >= 35  # issue 19 counted 35 before the root was added
    for cls in classes:
        assert issubclass(cls, MaggError), cls
        if cls in (MaggError, LambdaInvokeError):  # the root, and a base of several branches
            continue
        assert sum(issubclass(cls, branch) for branch in BRANCHES) == 1, cls
        assert cls.kind == next(b for b in BRANCHES if issubclass(cls, b)).kind


@pytest.mark.parametrize(
    ("cls", "builtin", "kind"),
    [
        (ConfigError, ValueError, "input"),
        (TemplateMismatchError, ValueError, "input"),
        (CellTimeoutError, TimeoutError, "transient"),
        (CredentialsRejectedError, ConnectionError, "transient"),
        (TruncatedFileError, EOFError, "permanent"),
        (CellFailedError, RuntimeError, "permanent"),
    ],
)
def test_the_branches_keep_the_builtin_bases(cls, builtin, kind):
    exc = cls("message")
    assert isinstance(exc, builtin) and exc.kind == kind
    assert is_transient(exc) is (kind == "transient")
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls and str(copy) == "message"


@pytest.mark.parametrize("kind", ["input", "transient", "permanent"])
def test_a_branch_survives_its_word(kind):
    exc = error_from_kind(error_kind(_RAISED[kind]), "cell 7: it failed")
    assert exc.kind == kind and str(exc) == "cell 7: it failed"
    assert is_transient(exc) is (kind == "transient")


_RAISED = {
    "input": ConfigError("no such column"),
    "transient": TransientReadError("throttled"),
    "permanent": CellFailedError("cell 7 is partial"),
}


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (client_error("SlowDown", 503), "transient"),
        (client_error("AccessDenied", 403), "permanent"),  # the store's policy, see error_kind
        (client_error("NoSuchKey", 404), "permanent"),
        (KeyError("h_li"), "permanent"),
    ],
)
def test_the_branch_of_a_library_error(exc, kind):
    assert error_kind(exc) == kind


def test_an_unknown_word_is_permanent():
    # Nothing says a retry could help.
    assert type(error_from_kind("sometimes", "x")) is PermanentError
    assert type(error_from_kind(None, "x")) is PermanentError


@pytest.mark.parametrize(
    ("message", "answer"),
    [
        ("Generic S3 error: status code: 503, <Code>SlowDown</Code>", (503, "SlowDown")),
        ("... status code: 400 ... <Error><Code>ExpiredToken</Code>", (400, "ExpiredToken")),
        ("error sending request for url: connection refused", (None, None)),
    ],
)
def test_the_s3_answer_of_an_obstore_error(message, answer):
    exc = obstore_errors.GenericError(message)
    assert s3_answer(exc) == answer
    assert s3_answer(client_error("SlowDown", 503)) == (503, "SlowDown")


def test_an_obstore_refusal_is_transient_only_when_the_token_expired():
    expired = obstore_errors.PermissionDeniedError("status code: 400 <Code>ExpiredToken</Code>")
    denied = obstore_errors.PermissionDeniedError("status code: 403 <Code>AccessDenied</Code>")
    assert is_transient(expired) and not is_transient(denied)


@pytest.mark.parametrize("kind", ["input", "transient", "permanent"])
def test_the_branch_of_an_ecs_child_failure_reaches_the_parent(kind):
    state = failed_state(_RAISED[kind])
    assert state.is_failed() and state.name == FAILED_STATE_NAMES[kind]
    with pytest.raises(MaggError) as caught:
        raise_if_child_failed(state, "cell 7")
    assert caught.value.kind == kind and str(caught.value).startswith("cell 7: ")


def test_refused_credentials_of_an_ecs_child_reach_the_parent_as_such():
    state = failed_state(CredentialsRejectedError("ExpiredToken"))
    with pytest.raises(CredentialsRejectedError):
        raise_if_child_failed(state, "granule G")
