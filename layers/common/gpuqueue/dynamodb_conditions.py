"""Telling a lost DynamoDB condition apart from every other error."""

from __future__ import annotations

from botocore.exceptions import ClientError


def is_conditional_failure(error: ClientError) -> bool:
    """The write's ConditionExpression did not hold (someone else got there first)."""
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
