"""Setup for the Lambda backend: a safe boto3 client and the shared concurrency limit."""

from __future__ import annotations

import os
from typing import Any

from botocore.config import Config
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from deployments.aws.lambda_client import lambda_client_config
from magg.tasks.cells import LAMBDA_CONCURRENCY_LIMIT

DEFAULT_LAMBDA_CONCURRENCY = 1000
"""AWS's default account-wide concurrency; lower it (``prefect gcl update magg-lambda
--limit N`` or the ``concurrency`` parameter) to leave room for other functions."""


def lambda_client(
    aws_credentials_block: str | None, function_timeout_s: int, connections: int
) -> Any:
    """A Lambda client that waits longer than the function may run and never retries.

    botocore's defaults (60 s read timeout, automatic retries) would invoke a
    long cell twice without anyone noticing; retries belong to the Prefect
    task, where they are visible and counted.

    Parameters
    ----------
    aws_credentials_block
        A prefect-aws ``AwsCredentials`` block (endpoint, profile, keys, region);
        the ambient AWS configuration when ``None``. The region is the block's,
        else ``AWS_REGION``, else ``AWS_DEFAULT_REGION`` or the profile's.
    function_timeout_s
        The deployed function's timeout.
    connections
        Invocations in flight at once: the connection pool must hold them all,
        or every call past botocore's default 10 opens and drops a connection.

    Raises
    ------
    ValueError
        If no region is configured anywhere.
    """
    # Imported here, not with the module: prefect-aws takes ~0.3 s of CPU to
    # import, which every run would pay during its start-up, beside the
    # temporary server's, and only a Lambda run uses it.
    from prefect_aws import AwsCredentials

    credentials = (
        AwsCredentials.load(aws_credentials_block) if aws_credentials_block else AwsCredentials()
    )
    # The block's botocore config (proxies, user agent …) is kept, but the
    # timeout and retry policy here must win over whatever it says.
    params = credentials.aws_client_parameters.get_params_override()
    safe = lambda_client_config(function_timeout_s).merge(Config(max_pool_connections=connections))
    params["config"] = params["config"].merge(safe) if "config" in params else safe
    session = credentials.get_boto3_session()
    region = _region(credentials.region_name, session.region_name)
    return session.client("lambda", region_name=region, **params)


def _region(block: str | None, botocore: str | None) -> str:
    """The block's region, else ``AWS_REGION``, else botocore's.

    botocore reads ``AWS_DEFAULT_REGION`` and the profile's region but not
    ``AWS_REGION``, which AWS's own runtimes (Lambda, ECS) set and which the
    AWS CLI v2 and the other SDKs read first ("overrides AWS_DEFAULT_REGION
    and the profile setting region", AWS CLI environment variables docs);
    without it a run with only ``AWS_REGION`` failed with botocore's "You
    must specify a region".
    """
    region = block or os.environ.get("AWS_REGION") or botocore
    if not region:
        raise ValueError(
            "no AWS region for invoking Lambda: set AWS_REGION (or AWS_DEFAULT_REGION, a "
            "profile's region, or region_name in the AwsCredentials block)"
        )
    return region


def lambda_concurrency(limit: int | None) -> int:
    """The global limit on concurrent invocations, set to ``limit`` if one is given.

    Without ``limit`` an existing limit is left as an operator set it, and a
    missing one is created at :data:`DEFAULT_LAMBDA_CONCURRENCY`.
    """
    with get_client(sync_client=True) as client:
        if limit is None:
            try:
                return client.read_global_concurrency_limit_by_name(LAMBDA_CONCURRENCY_LIMIT).limit
            except ObjectNotFound:
                limit = DEFAULT_LAMBDA_CONCURRENCY
        client.upsert_global_concurrency_limit_by_name(LAMBDA_CONCURRENCY_LIMIT, limit)
    return limit
