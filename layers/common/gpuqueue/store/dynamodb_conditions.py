"""Telling a lost DynamoDB condition apart from every other error, and what it found."""

from __future__ import annotations

from typing import Any

from boto3.dynamodb.types import TypeDeserializer
from botocore.exceptions import ClientError

_DESERIALIZER = TypeDeserializer()


def is_conditional_failure(error: ClientError) -> bool:
    """The write's ConditionExpression did not hold (someone else got there first)."""
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def refused_item(error: ClientError) -> dict[str, Any] | None:
    """The item a refused write found, with ReturnValuesOnConditionCheckFailure=ALL_OLD
    (DynamoDB's wire format even through a resource, so decoded here)."""
    raw = error.response.get("Item")
    if not isinstance(raw, dict) or not raw:
        return None
    return {k: _DESERIALIZER.deserialize(v) for k, v in raw.items()}
