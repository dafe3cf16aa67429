"""The operator's boto3 clients (provisioning, not a function's): one per service, region,
endpoint and key. Tests provision hundreds of stacks and a client costs ~20 ms to build."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import boto3

_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@cache
def _cached(service: str, region: str, *environment: str) -> Any:
    # Built from the environment, as boto3.client would be; `environment` keys the cache.
    return boto3.client(service, region_name=region)  # type: ignore[call-overload]


def operator_client(service: str, region: str) -> Any:
    """boto3.client(service, region_name=region), reused while the environment is the same."""
    return _cached(service, region, *(os.environ.get(name, "") for name in _ENVIRONMENT))
