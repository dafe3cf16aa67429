"""Event shapes Lambda's pollers build, so local code feeds handlers what AWS would.

SQS batches, and DynamoDB Streams batches: the event, FilterCriteria filtering, partial
batch responses (the checkpoint) and the OnFailure destination's record.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gpuqueue_local.event_patterns import UnsupportedPattern, matches_validated, validate_pattern

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


# --------------------------------------------------------------------------- DynamoDB Streams

DYNAMODB_EVENT_VERSION = "1.1"  # what Lambda's DynamoDB Streams events carry
DYNAMODB_EVENT_SOURCE = "aws:dynamodb"
REPORT_BATCH_ITEM_FAILURES = "ReportBatchItemFailures"


def dynamodb_stream_event(
    records: Iterable[Mapping[str, Any]], stream_arn: str, region: str
) -> dict[str, Any]:
    """The `Records` event a DynamoDB Streams event source mapping hands the function.

    `records` are GetRecords records as boto3 returns them (ApproximateCreationDateTime a
    datetime, binary attributes bytes) or already in the event's shape; either way the
    event has what Lambda sends: epoch seconds, base64 binaries, eventVersion 1.1, the
    stream's ARN and region.
    """
    return {
        "Records": [
            dynamodb_stream_record(r, stream_arn=stream_arn, region=region) for r in records
        ]
    }


def dynamodb_stream_record(
    record: Mapping[str, Any], *, stream_arn: str, region: str
) -> dict[str, Any]:
    """One record of `dynamodb_stream_event` (the shape FilterCriteria patterns see too)."""
    stream = record.get("dynamodb") or {}
    body: dict[str, Any] = {}
    created = stream.get("ApproximateCreationDateTime")
    if created is not None:
        body["ApproximateCreationDateTime"] = epoch_seconds(created)
    body["Keys"] = _attribute_map(stream.get("Keys") or {})
    for image in ("NewImage", "OldImage"):
        if image in stream:
            body[image] = _attribute_map(stream[image])
    body["SequenceNumber"] = str(stream.get("SequenceNumber", ""))
    body["SizeBytes"] = int(stream.get("SizeBytes", 0))
    body["StreamViewType"] = stream.get("StreamViewType", "NEW_AND_OLD_IMAGES")
    event: dict[str, Any] = {
        "eventID": record.get("eventID", ""),
        "eventName": record.get("eventName", ""),
        "eventVersion": DYNAMODB_EVENT_VERSION,
        "eventSource": DYNAMODB_EVENT_SOURCE,
        "awsRegion": region,
        "dynamodb": body,
        "eventSourceARN": stream_arn,
    }
    if record.get("userIdentity"):  # TTL deletions: {"type": "Service", "principalId": ...}
        event["userIdentity"] = dict(record["userIdentity"])
    return event


def epoch_seconds(value: Any) -> int:
    """A stream record's time as the event has it: UNIX epoch seconds, rounded down."""
    if isinstance(value, datetime):
        return int(value.timestamp())
    return int(float(value))


def _attribute_map(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {str(name): _attribute_value(value) for name, value in attributes.items()}


def _attribute_value(value: Any) -> Any:
    """DynamoDB JSON as Lambda's event carries it: binaries base64, everything else as is."""
    if not isinstance(value, Mapping) or len(value) != 1:
        return value
    ((kind, inner),) = value.items()
    if kind == "B":
        return {"B": _base64(inner)}
    if kind == "BS":
        return {"BS": [_base64(b) for b in inner]}
    if kind == "M":
        return {"M": _attribute_map(inner)}
    if kind == "L":
        return {"L": [_attribute_value(v) for v in inner]}
    return {kind: inner}


def _base64(data: Any) -> Any:
    if isinstance(data, bytes | bytearray):
        return base64.b64encode(bytes(data)).decode("ascii")
    return data  # already base64 text


def stream_filters(criteria: Any) -> list[dict[str, Any]]:
    """The patterns of a FilterCriteria, validated (UnsupportedPattern if the matcher can't).

    Takes the template's `FilterCriteria` ({"Filters": [{"Pattern": "<json>"}]}), its
    `Filters` list, or a list of patterns (JSON text or dicts). None / empty: no filters.
    """
    if not criteria:
        return []
    if isinstance(criteria, Mapping) and "Filters" in criteria:
        criteria = criteria["Filters"] or []
    if isinstance(criteria, str | Mapping):
        criteria = [criteria]
    patterns: list[dict[str, Any]] = []
    for entry in criteria:
        pattern = entry["Pattern"] if isinstance(entry, Mapping) and "Pattern" in entry else entry
        if isinstance(pattern, str):
            try:
                pattern = json.loads(pattern)
            except ValueError as error:
                raise UnsupportedPattern(f"a filter pattern is not JSON: {pattern!r}") from error
        validate_pattern(pattern)  # a JSON object using only what the matcher implements
        patterns.append(dict(pattern))
    return patterns


def filter_records(
    filters: Any,
    records: Iterable[Mapping[str, Any]],
    *,
    stream_arn: str | None = None,
    region: str | None = None,
) -> list[Any]:
    """The records Lambda's event filtering lets through, in order (the same objects).

    A record passes when any filter's pattern matches it in its event shape
    (`dynamodb_stream_record`: eventName, dynamodb.Keys/NewImage/OldImage in DynamoDB
    JSON, ...); no filters lets everything through. Non-matching records are dropped, as
    Lambda drops them. `filters` is anything `stream_filters` takes.
    """
    patterns = stream_filters(filters)
    items = list(records)
    if not patterns:
        return items
    passed = []
    for record in items:
        shaped = dynamodb_stream_record(
            record,
            stream_arn=stream_arn if stream_arn is not None else record.get("eventSourceARN", ""),
            region=region if region is not None else record.get("awsRegion", ""),
        )
        if any(matches_validated(pattern, shaped) for pattern in patterns):
            passed.append(record)
    return passed


def stream_batch_checkpoint(
    records: Sequence[Mapping[str, Any]],
    response: Any,
    *,
    report_batch_item_failures: bool = True,
) -> int:
    """How many leading records of a successful invocation's batch are done.

    len(records): all of them (no ReportBatchItemFailures, a null or empty response or
    batchItemFailures list). Otherwise the index of the lowest sequence number reported:
    Lambda checkpoints before it and retries from it on. An itemIdentifier that is empty,
    null or not in the batch fails the whole batch (0).
    """
    if not report_batch_item_failures or not isinstance(response, Mapping):
        return len(records)
    failures = response.get("batchItemFailures")
    if not failures:
        return len(records)
    if not isinstance(failures, list):
        return 0
    position = {_sequence_number(r): i for i, r in enumerate(records)}
    first = len(records)
    for failure in failures:
        identifier = failure.get("itemIdentifier") if isinstance(failure, Mapping) else None
        if identifier in (None, "") or str(identifier) not in position:
            return 0
        first = min(first, position[str(identifier)])
    return first


def _sequence_number(record: Mapping[str, Any]) -> str:
    return str((record.get("dynamodb") or {}).get("SequenceNumber", ""))


def stream_batch_failure_record(
    records: Sequence[Mapping[str, Any]],
    *,
    shard_id: str,
    stream_arn: str,
    function_arn: str,
    invoke_count: int,
    function_error: str | None = "Unhandled",
    condition: str = "RetryAttemptsExhausted",
) -> dict[str, Any]:
    """What Lambda sends an OnFailure destination for a discarded DynamoDB Streams batch.

    Metadata only (DDBStreamBatchInfo: shard, first and last sequence numbers, approximate
    arrival times, size, stream): the records themselves stay in the stream. responseContext
    has functionError only when the last invocation failed (not a partial batch response).
    """
    first, last = records[0], records[-1]
    response: dict[str, Any] = {"statusCode": 200, "executedVersion": "$LATEST"}
    if function_error:
        response["functionError"] = function_error
    return {
        "requestContext": {
            "requestId": str(uuid.uuid4()),
            "functionArn": function_arn,
            "condition": condition,
            "approximateInvokeCount": invoke_count,
        },
        "responseContext": response,
        "version": "1.0",
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "DDBStreamBatchInfo": {
            "shardId": shard_id,
            "startSequenceNumber": _sequence_number(first),
            "endSequenceNumber": _sequence_number(last),
            "approximateArrivalOfFirstRecord": _arrival(first),
            "approximateArrivalOfLastRecord": _arrival(last),
            "batchSize": len(records),
            "streamArn": stream_arn,
        },
    }


def _arrival(record: Mapping[str, Any]) -> str | None:
    created = (record.get("dynamodb") or {}).get("ApproximateCreationDateTime")
    if created is None:
        return None
    moment = datetime.fromtimestamp(epoch_seconds(created), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
