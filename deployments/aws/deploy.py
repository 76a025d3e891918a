"""Publish the layer and create or update the Lambda function (boto3; needs AWS).

One command for both the first deployment and every update, so the function's
settings live here rather than in someone's shell history: Python 3.12 on
arm64 (cheaper per GB-second than x86 and what the layer is built for),
2,048 MB (a dense polar cell peaks at ~1.5 GB), a 720 s timeout (the flow's
per-cell timeout matches it), the seed's handler path, and the store prefixes
the function may write below (``MAGG_ALLOWED_STORES``, from ``--allowed-store``:
the handler refuses any other store an event names, and every store when unset).

The layer zip (~60 MB) is over the 50 MB limit of a direct upload, so it goes
through an S3 bucket you own in the function's region. Credentials and
region come from the usual AWS chain (``AWS_PROFILE``, ``AWS_REGION``,
``AWS_DEFAULT_REGION``, …); ``AWS_ENDPOINT_URL`` points it elsewhere (the tests
use a moto server).

Usage::

    python -m deployments.aws.deploy \\
        --role-arn arn:aws:iam::ACCOUNT_ID:role/magg-lambda \\
        --artifact-bucket my-deploy-bucket \\
        --allowed-store s3://my-magg-output/atl06/

The IAM permissions this needs, and those the function's role needs, are in
``deployments/aws/iam/``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from deployments.aws.package import BUILD_DIR, HANDLER, LAMBDA_PYTHON
from magg_core.urls import ALLOWED_STORES_VARIABLE, URLError, parse_allowed_stores

FUNCTION_NAME = "magg-process-cell"
"""The name ``process-cycle`` invokes by default (its ``lambda_function``)."""
LAYER_NAME = "magg-layer-arm64"
RUNTIME = f"python{LAMBDA_PYTHON}"
ARCHITECTURE = "arm64"
MEMORY_MB = 2048
TIMEOUT_S = 720


@dataclass(frozen=True)
class FunctionSettings:
    """Everything ``create-function`` is told, in one place."""

    name: str = FUNCTION_NAME
    role_arn: str = ""
    runtime: str = RUNTIME
    architecture: str = ARCHITECTURE
    handler: str = HANDLER
    memory_mb: int = MEMORY_MB
    timeout_s: int = TIMEOUT_S
    allowed_stores: tuple[str, ...] = ()
    """``s3://bucket/prefix/`` URLs the handler may write stores below."""

    def configuration(self, layer_arn: str) -> dict[str, Any]:
        return {
            "FunctionName": self.name,
            "Role": self.role_arn,
            "Runtime": self.runtime,
            "Handler": self.handler,
            "MemorySize": self.memory_mb,
            "Timeout": self.timeout_s,
            "Layers": [layer_arn],
            "Environment": {"Variables": {ALLOWED_STORES_VARIABLE: ",".join(self.allowed_stores)}},
        }


def aws_client(service: str) -> Any:
    """A boto3 client in ``AWS_REGION`` if set, else botocore's region.

    botocore ignores ``AWS_REGION``, which the AWS CLI v2 and the other SDKs
    read first (it overrides ``AWS_DEFAULT_REGION`` and the profile's region).
    """
    return boto3.client(service, region_name=os.environ.get("AWS_REGION"))


def publish_layer(zip_path: Path, bucket: str, *, layer_name: str = LAYER_NAME) -> str:
    """Upload the layer zip to ``bucket`` and publish it; returns the version's ARN.

    The description carries the zip's hash: deploying the same build again
    re-uses the newest version instead of publishing an identical one, and
    every version says which build it holds.
    """
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()[:16]
    description = f"magg cell dependencies, build {digest}"
    client = aws_client("lambda")
    latest = client.list_layer_versions(LayerName=layer_name)["LayerVersions"][:1]
    if latest and latest[0].get("Description") == description:
        return latest[0]["LayerVersionArn"]  # this build is already the newest version
    key = f"magg/lambda/{layer_name}-{digest}.zip"
    aws_client("s3").upload_file(str(zip_path), bucket, key)
    response = client.publish_layer_version(
        LayerName=layer_name,
        Description=description,
        Content={"S3Bucket": bucket, "S3Key": key},
        CompatibleRuntimes=[RUNTIME],
        CompatibleArchitectures=[ARCHITECTURE],
    )
    return response["LayerVersionArn"]


def deploy_function(zip_path: Path, layer_arn: str, settings: FunctionSettings) -> dict[str, Any]:
    """Create the function, or update its code and configuration; returns its configuration.

    Updates go in two calls (code, then configuration) because Lambda
    refuses a configuration change while a code update is in progress; the
    waiter between them is the documented way to sequence them.
    """
    client = aws_client("lambda")
    code = zip_path.read_bytes()
    configuration = settings.configuration(layer_arn)
    try:
        client.get_function(FunctionName=settings.name)
    except client.exceptions.ResourceNotFoundException:
        client.create_function(
            **configuration,
            Code={"ZipFile": code},
            Architectures=[settings.architecture],
            Description="magg: one HEALPix parent cell of ICESat-2 ATL06 per invocation",
        )
        client.get_waiter("function_active_v2").wait(FunctionName=settings.name)
    else:
        client.update_function_code(
            FunctionName=settings.name, ZipFile=code, Architectures=[settings.architecture]
        )
        client.get_waiter("function_updated_v2").wait(FunctionName=settings.name)
        client.update_function_configuration(**configuration)
        client.get_waiter("function_updated_v2").wait(FunctionName=settings.name)
    return client.get_function_configuration(FunctionName=settings.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.aws.deploy", description=__doc__)
    parser.add_argument("--role-arn", required=True, help="the function's execution role")
    parser.add_argument("--artifact-bucket", required=True, help="bucket for the layer upload")
    parser.add_argument(
        "--allowed-store",
        action="append",
        required=True,
        metavar="S3_PREFIX",
        help="s3://bucket/prefix/ the function may write stores below (repeatable); "
        "the same prefixes as the role's policy",
    )
    parser.add_argument("--function-name", default=FUNCTION_NAME)
    parser.add_argument("--function-zip", type=Path, default=BUILD_DIR / "function.zip")
    parser.add_argument("--layer-zip", type=Path, default=BUILD_DIR / "layer-arm64.zip")
    args = parser.parse_args(argv)
    try:
        prefixes = parse_allowed_stores(",".join(args.allowed_store))
    except URLError as exc:
        parser.error(f"--allowed-store: {exc}")

    layer_arn = publish_layer(args.layer_zip, args.artifact_bucket)
    print(f"layer: {layer_arn}")
    settings = FunctionSettings(
        name=args.function_name,
        role_arn=args.role_arn,
        allowed_stores=tuple(f"{prefix.url}/" for prefix in prefixes),
    )
    configuration = deploy_function(args.function_zip, layer_arn, settings)
    print(
        f"function: {configuration['FunctionArn']} ({configuration['Runtime']}, "
        f"{'/'.join(configuration['Architectures'])}, {configuration['MemorySize']} MB, "
        f"{configuration['Timeout']} s, handler {configuration['Handler']})"
    )
    print(f"writes stores below: {', '.join(settings.allowed_stores)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
