"""Setup for the Lambda backend: a safe boto3 client and the shared concurrency limit."""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect_aws import AwsCredentials

from magg_core.lambda_client import lambda_client_config
from tasks.cells import CELL_TIMEOUT_S, LAMBDA_CONCURRENCY_LIMIT


def lambda_client(aws_credentials_block: str | None) -> Any:
    """A Lambda client that waits longer than the function may run and never retries.

    botocore's defaults (60 s read timeout, automatic retries) would invoke a
    long cell twice without anyone noticing; retries belong to the Prefect
    task, where they are visible and counted.
    """
    credentials = (
        AwsCredentials.load(aws_credentials_block) if aws_credentials_block else AwsCredentials()
    )
    # AwsCredentials.get_client would use the block's botocore config; the
    # timeout and retry policy here must win over whatever the block says.
    params = credentials.aws_client_parameters.get_params_override()
    params["config"] = lambda_client_config(CELL_TIMEOUT_S)
    return credentials.get_boto3_session().client(
        "lambda", region_name=credentials.region_name, **params
    )


def ensure_lambda_concurrency(limit: int) -> int:
    """Create or resize the global limit on concurrent invocations; return it."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(LAMBDA_CONCURRENCY_LIMIT, limit)
    return limit
