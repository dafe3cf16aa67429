"""Event shapes Lambda's pollers build, so local code feeds handlers what AWS would."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import MessageTypeDef


def sqs_event(messages: Iterable[MessageTypeDef], *, queue_arn: str, region: str) -> dict[str, Any]:
    """The `Records` event an SQS event source mapping hands the function."""
    records = []
    for message in messages:
        body = message.get("Body", "")
        records.append(
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": body,
                "attributes": {str(k): v for k, v in message.get("Attributes", {}).items()},
                "messageAttributes": dict(message.get("MessageAttributes", {})),
                "md5OfBody": message.get("MD5OfBody") or hashlib.md5(body.encode()).hexdigest(),  # noqa: S324
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": region,
            }
        )
    return {"Records": records}


def settle_batch(
    sqs: SQSClient,
    queue_url: str,
    messages: Iterable[MessageTypeDef],
    response: Mapping[str, Any] | None,
    *,
    function_failed: bool = False,
) -> list[str]:
    """Do what the ESM does with a partial batch response; return the failed message ids.

    A function error, or a response naming an id that is empty or not in the batch, fails the
    whole batch (nothing is deleted). Otherwise every message not named is deleted.
    """
    batch = list(messages)
    ids = {m["MessageId"] for m in batch}
    if function_failed:
        return sorted(ids)
    failures = (response or {}).get("batchItemFailures") or []
    failed = {str(f.get("itemIdentifier") or "") for f in failures}
    if "" in failed or not failed <= ids:
        return sorted(ids)
    for message in batch:
        if message["MessageId"] not in failed:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return sorted(failed)
