"""boto3 clients and resources, built once per container with explicit timeouts.

boto3 honours AWS_ENDPOINT_URL, so the same code talks to AWS or the local stack.
Default botocore timeouts are 60 s; a Lambda must never hang that long on one call.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_cognito_idp import CognitoIdentityProviderClient
    from mypy_boto3_dynamodb import DynamoDBClient, DynamoDBServiceResource
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_ssm import SSMClient

SDK_CONFIG = Config(
    connect_timeout=2,
    read_timeout=5,
    retries={"max_attempts": 3, "mode": "standard"},
)


@cache
def dynamodb() -> DynamoDBServiceResource:
    return boto3.resource("dynamodb", config=SDK_CONFIG)


@cache
def dynamodb_client() -> DynamoDBClient:
    """The low-level client (typed attribute values), for libraries that want one: the
    resource's own `meta.client` serialises Python values itself and would do it twice."""
    return boto3.client("dynamodb", config=SDK_CONFIG)


@cache
def sqs() -> SQSClient:
    return boto3.client("sqs", config=SDK_CONFIG)


@cache
def s3() -> S3Client:
    # SigV4 everywhere: presigned URLs must carry an explicit, short X-Amz-Expires.
    return boto3.client("s3", config=SDK_CONFIG.merge(Config(signature_version="s3v4")))


@cache
def cognito() -> CognitoIdentityProviderClient:
    return boto3.client("cognito-idp", config=SDK_CONFIG)


@cache
def secretsmanager() -> SecretsManagerClient:
    return boto3.client("secretsmanager", config=SDK_CONFIG)


@cache
def ssm() -> SSMClient:
    return boto3.client("ssm", config=SDK_CONFIG)


def reset() -> None:
    """Forget every cached client (tests point boto3 at a fresh backend)."""
    for factory in (dynamodb, dynamodb_client, sqs, s3, cognito, secretsmanager, ssm):
        factory.cache_clear()
