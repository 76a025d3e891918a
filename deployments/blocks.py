"""Create the Prefect blocks the deployments refer to by name. Safe to re-run.

``magg-earthdata`` (Secret)
    The Earthdata login: a token, or a username and password. Read from
    ``EARTHDATA_TOKEN`` or ``EARTHDATA_USERNAME``/``EARTHDATA_PASSWORD``, or
    asked for without echo — never taken from the command line, where it would
    land in shell history and the process list.
``magg-aws`` (AwsCredentials)
    How flows reach AWS (the Lambda backend's client, result storage). By
    default it holds only the region, and boto3 finds the identity itself (an
    instance or task role, ``AWS_PROFILE``); ``--keys-from-environment``
    stores the ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` of this shell
    instead, for a worker machine without a role.
``magg-results`` (S3Bucket)
    Where task results and cache records go, so a retried run skips the cells
    that finished even on another machine or container.

Usage::

    python -m deployments.blocks earthdata
    python -m deployments.blocks aws --region us-west-2
    python -m deployments.blocks results --bucket my-results-bucket
"""

from __future__ import annotations

import argparse
import getpass
import os

from prefect.blocks.system import Secret
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

from deployments.steps import EARTHDATA_BLOCK

AWS_BLOCK = "magg-aws"
RESULTS_BLOCK = "magg-results"


def save_earthdata() -> str:
    """Save the Earthdata login from the environment (or a prompt) as a Secret block."""
    if token := os.environ.get("EARTHDATA_TOKEN"):
        value: str | dict[str, str] = token
    else:
        username = os.environ.get("EARTHDATA_USERNAME") or input("Earthdata username: ")
        password = os.environ.get("EARTHDATA_PASSWORD") or getpass.getpass("Earthdata password: ")
        if not username or not password:
            raise SystemExit("an Earthdata username and password (or a token) are needed")
        value = {"username": username, "password": password}
    Secret(value=value).save(EARTHDATA_BLOCK, overwrite=True)
    return f"Secret block {EARTHDATA_BLOCK!r}: Earthdata login saved"


def save_aws(region: str, keys_from_environment: bool, endpoint_url: str | None) -> str:
    """Save an AwsCredentials block: region only (ambient identity), or this shell's keys."""
    fields: dict[str, object] = {"region_name": region}
    if keys_from_environment:
        missing = [n for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if n not in os.environ]
        if missing:
            raise SystemExit(f"--keys-from-environment: {', '.join(missing)} not set")
        fields["aws_access_key_id"] = os.environ["AWS_ACCESS_KEY_ID"]
        fields["aws_secret_access_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        fields["aws_session_token"] = os.environ.get("AWS_SESSION_TOKEN")
    if endpoint_url:
        fields["aws_client_parameters"] = AwsClientParameters(endpoint_url=endpoint_url)
    AwsCredentials(**fields).save(AWS_BLOCK, overwrite=True)
    identity = "keys from the environment" if keys_from_environment else "the ambient identity"
    return f"AwsCredentials block {AWS_BLOCK!r}: {region}, {identity}"


def save_results(bucket: str, prefix: str) -> str:
    """Save the S3Bucket block for result storage, using the ``magg-aws`` credentials."""
    S3Bucket(
        bucket_name=bucket, bucket_folder=prefix, credentials=AwsCredentials.load(AWS_BLOCK)
    ).save(RESULTS_BLOCK, overwrite=True)
    return f"S3Bucket block {RESULTS_BLOCK!r}: s3://{bucket}/{prefix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.blocks", description=__doc__)
    sub = parser.add_subparsers(dest="block", required=True)
    sub.add_parser("earthdata", help=f"Secret block {EARTHDATA_BLOCK!r}")
    aws = sub.add_parser("aws", help=f"AwsCredentials block {AWS_BLOCK!r}")
    aws.add_argument("--region", default="us-west-2", help="NSIDC's data are in us-west-2")
    aws.add_argument("--keys-from-environment", action="store_true")
    aws.add_argument("--endpoint-url", help="an S3-compatible endpoint instead of AWS")
    results = sub.add_parser("results", help=f"S3Bucket block {RESULTS_BLOCK!r}")
    results.add_argument("--bucket", required=True)
    results.add_argument("--prefix", default="prefect-results")
    args = parser.parse_args(argv)

    if args.block == "earthdata":
        message = save_earthdata()
    elif args.block == "aws":
        message = save_aws(args.region, args.keys_from_environment, args.endpoint_url)
    else:
        message = save_results(args.bucket, args.prefix)
    print(message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
