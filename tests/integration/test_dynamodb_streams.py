"""DynamoDB Streams on moto: the reader, the local event source mapping, and the routing.

In-process moto (mock_aws) for the behaviour; then the same reader through a moto server,
threaded (the integration harness's) and as a subprocess (the local stack's), proving that
calls signed for "dynamodb" reach moto's Streams backend.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
import requests
from moto import mock_aws

from gpuqueue_local import moto_iam
from gpuqueue_local.dynamodb_streams import DynamoDbStreamSource, StreamReader, streams_client
from gpuqueue_local.event_sources import dynamodb_stream_event, filter_records
from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.stack import MotoServer
from gpuqueue_testing import wait_for

REGION = "us-east-1"
FINISHED = ["DONE", "FAILED", "CANCELED", "EXPIRED"]
TRANSITIONS = {
    "Filters": [
        {
            "Pattern": json.dumps(
                {
                    "eventName": ["MODIFY"],
                    "dynamodb": {
                        "NewImage": {"status": {"S": FINISHED}},
                        "OldImage": {"status": {"S": [{"anything-but": FINISHED}]}},
                    },
                }
            )
        }
    ]
}
FAST_RETRIES = (0.01, 0.02)


@dataclass
class Aws:
    table: str
    stream_arn: str
    queue_url: str
    queue_arn: str

    def put(self, task_id: str, status: str) -> None:
        boto3.client("dynamodb", region_name=REGION).put_item(
            TableName=self.table, Item={"task_id": {"S": task_id}, "status": {"S": status}}
        )

    def delete(self, task_id: str) -> None:
        boto3.client("dynamodb", region_name=REGION).delete_item(
            TableName=self.table, Key={"task_id": {"S": task_id}}
        )

    def dead_letters(self) -> list[dict[str, Any]]:
        sqs = boto3.client("sqs", region_name=REGION)
        messages = sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get(
            "Messages", []
        )
        return [json.loads(m["Body"]) for m in messages]


def make_resources() -> Aws:
    ddb = boto3.client("dynamodb", region_name=REGION)
    table = ddb.create_table(
        TableName="tasks",
        KeySchema=[{"AttributeName": "task_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "task_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )["TableDescription"]
    sqs = boto3.client("sqs", region_name=REGION)
    queue_url = sqs.create_queue(QueueName="task-events-dlq")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    return Aws(
        table="tasks",
        stream_arn=table["LatestStreamArn"],
        queue_url=queue_url,
        queue_arn=queue_arn,
    )


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    """In-process moto: no endpoint URL, so botocore's own endpoint resolution is exercised."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        # IAM may be enforced in this process (the integration harness's moto server shares
        # it): the key mock_aws signs with belongs to the operator.
        moto_iam.seed_admin(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
        yield make_resources()


@dataclass
class FakeFunction:
    """Stands in for a FunctionRuntime: keeps each event; `answer` shapes the result."""

    answer: Any = None  # (records, call number) -> InvocationResult | None
    events: list[dict[str, Any]] = field(default_factory=list)
    invoked_at: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        with self.lock:
            self.events.append(event)
            self.invoked_at.append(time.monotonic())
            call = len(self.events)
        result = self.answer(event["Records"], call) if self.answer else None
        return result or InvocationResult(ok=True)

    def batches(self) -> list[list[tuple[str, str]]]:
        """Each invocation's records as (task id, new status or the event name)."""
        with self.lock:
            return [
                [
                    (
                        r["dynamodb"]["Keys"]["task_id"]["S"],
                        r["dynamodb"].get("NewImage", {}).get("status", {}).get("S")
                        or r["eventName"],
                    )
                    for r in event["Records"]
                ]
                for event in self.events
            ]


@pytest.fixture
def sources() -> Iterator[list[DynamoDbStreamSource]]:
    started: list[DynamoDbStreamSource] = []
    yield started
    for source in started:
        source.stop()


def run(sources: list[DynamoDbStreamSource], source: DynamoDbStreamSource) -> DynamoDbStreamSource:
    source.start()
    sources.append(source)
    return source


# --------------------------------------------------------------------------- the reader


def test_the_reader_returns_insert_modify_remove_in_order_then_only_new_records(aws: Aws) -> None:
    reader = StreamReader(streams_client(REGION), aws.stream_arn)
    aws.put("a", "QUEUED")
    aws.put("a", "RUNNING")
    aws.delete("a")

    first = reader.read()
    aws.put("b", "QUEUED")
    second = reader.read()

    assert [r["eventName"] for r in first] == ["INSERT", "MODIFY", "REMOVE"]
    numbers = [int(r["dynamodb"]["SequenceNumber"]) for r in first]
    assert numbers == sorted(numbers)
    assert first[1]["dynamodb"]["OldImage"]["status"] == {"S": "QUEUED"}
    assert first[1]["dynamodb"]["NewImage"]["status"] == {"S": "RUNNING"}
    assert [(r["eventName"], r["dynamodb"]["Keys"]) for r in second] == [
        ("INSERT", {"task_id": {"S": "b"}})
    ]
    assert reader.read() == []


def test_latest_reads_only_what_is_written_after_the_reader_is_made(aws: Aws) -> None:
    aws.put("old", "QUEUED")

    reader = StreamReader(streams_client(REGION), aws.stream_arn, "LATEST")
    aws.put("new", "QUEUED")

    assert [r["dynamodb"]["Keys"]["task_id"]["S"] for r in reader.read()] == ["new"]


def test_the_harness_helpers_make_the_event_the_function_gets(aws: Aws) -> None:
    """Reader -> filter_records -> dynamodb_stream_event, no threads (the harness's path)."""
    reader = StreamReader(streams_client(REGION), aws.stream_arn)
    aws.put("a", "QUEUED")
    aws.put("a", "RUNNING")
    aws.put("a", "DONE")
    aws.put("a", "DONE")  # already final: filtered out

    event = dynamodb_stream_event(
        filter_records(TRANSITIONS, reader.read()), aws.stream_arn, REGION
    )

    [record] = event["Records"]
    assert record["eventName"] == "MODIFY"
    assert record["eventVersion"] == "1.1"
    assert record["eventSourceARN"] == aws.stream_arn
    assert record["dynamodb"]["OldImage"]["status"] == {"S": "RUNNING"}
    assert record["dynamodb"]["NewImage"]["status"] == {"S": "DONE"}
    assert isinstance(record["dynamodb"]["ApproximateCreationDateTime"], int)
    json.dumps(event)


# --------------------------------------------------------------------------- the source


def test_the_source_delivers_only_matching_records_in_order(
    aws: Aws, sources: list[DynamoDbStreamSource]
) -> None:
    function = FakeFunction()
    source = run(
        sources,
        DynamoDbStreamSource(
            function=function,
            stream_arn=aws.stream_arn,
            filters=list(TRANSITIONS["Filters"]),
            retry_backoff_s=FAST_RETRIES,
        ),
    )
    for task, final in (("a", "DONE"), ("b", "FAILED"), ("c", "CANCELED")):
        aws.put(task, "QUEUED")
        aws.put(task, "RUNNING")
        aws.put(task, final)
        aws.put(task, final)  # a rewrite of a finished task: no transition
    aws.delete("a")

    wait_for(
        lambda: source.filtered_out == 10 and source.idle,
        timeout=5,
        what="all 13 records read, the 10 that are no transition dropped",
    )
    assert [r for b in function.batches() for r in b] == [
        ("a", "DONE"),
        ("b", "FAILED"),
        ("c", "CANCELED"),
    ]


def test_a_partial_batch_failure_redelivers_from_the_failed_record_only(
    aws: Aws, sources: list[DynamoDbStreamSource]
) -> None:
    for task in "abcde":
        aws.put(task, "QUEUED")

    def fail_c_once(records: list[dict[str, Any]], call: int) -> InvocationResult | None:
        if call > 1:
            return None
        failed = [
            {"itemIdentifier": r["dynamodb"]["SequenceNumber"]}
            for r in records
            if r["dynamodb"]["Keys"]["task_id"]["S"] in ("c", "e")
        ]
        return InvocationResult(ok=True, payload={"batchItemFailures": failed})

    function = FakeFunction(answer=fail_c_once)
    source = run(
        sources,
        DynamoDbStreamSource(
            function=function,
            stream_arn=aws.stream_arn,
            report_batch_item_failures=True,
            retry_backoff_s=FAST_RETRIES,
        ),
    )

    wait_for(lambda: len(function.events) == 2 and source.idle, timeout=5, what="the retry")
    first, retry = function.batches()
    assert [t for t, _ in first] == ["a", "b", "c", "d", "e"]
    assert [t for t, _ in retry] == ["c", "d", "e"]  # a and b are not delivered again
    assert source.delivered == 5


def test_a_failing_function_is_retried_then_the_batch_goes_to_the_on_failure_queue(
    aws: Aws, sources: list[DynamoDbStreamSource]
) -> None:
    for task in "abc":
        aws.put(task, "QUEUED")

    def error_on_b(records: list[dict[str, Any]], _: int) -> InvocationResult | None:
        if any(r["dynamodb"]["Keys"]["task_id"]["S"] == "b" for r in records):
            return InvocationResult(ok=False, error_type="ValueError", error_message="poison")
        return None

    function = FakeFunction(answer=error_on_b)
    source = run(
        sources,
        DynamoDbStreamSource(
            function=function,
            stream_arn=aws.stream_arn,
            function_name="TaskEventsFunction",
            batch_size=2,
            maximum_retry_attempts=2,
            on_failure_arn=aws.queue_arn,
            retry_backoff_s=FAST_RETRIES,
        ),
    )

    wait_for(lambda: source.on_failure_sent == 1 and source.idle, timeout=5, what="skip")
    [record] = aws.dead_letters()

    assert [[t for t, _ in b] for b in function.batches()] == [["a", "b"]] * 3 + [["c"]]
    numbers = [r["dynamodb"]["SequenceNumber"] for r in function.events[0]["Records"]]
    info = record["DDBStreamBatchInfo"]
    assert info["startSequenceNumber"] == numbers[0]
    assert info["endSequenceNumber"] == numbers[1]
    assert info["batchSize"] == 2
    assert info["streamArn"] == aws.stream_arn
    assert info["shardId"].startswith("shardId-")
    assert info["approximateArrivalOfFirstRecord"].endswith("Z")
    assert record["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 3
    assert record["requestContext"]["functionArn"] == (
        "arn:aws:lambda:us-east-1:123456789012:function:TaskEventsFunction"
    )
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert source.discarded == 2


def test_bisection_sends_only_the_poison_record_to_the_on_failure_queue(
    aws: Aws, sources: list[DynamoDbStreamSource]
) -> None:
    for task in "abcd":
        aws.put(task, "QUEUED")

    def error_on_c(records: list[dict[str, Any]], _: int) -> InvocationResult | None:
        if any(r["dynamodb"]["Keys"]["task_id"]["S"] == "c" for r in records):
            return InvocationResult(ok=False, error_type="ValueError", error_message="poison")
        return None

    function = FakeFunction(answer=error_on_c)
    source = run(
        sources,
        DynamoDbStreamSource(
            function=function,
            stream_arn=aws.stream_arn,
            maximum_retry_attempts=0,
            bisect_on_function_error=True,
            on_failure_arn=aws.queue_arn,
            retry_backoff_s=FAST_RETRIES,
        ),
    )

    wait_for(lambda: source.on_failure_sent == 1 and source.idle, timeout=5, what="skip")

    delivered = [[t for t, _ in b] for b in function.batches()]
    assert delivered == [["a", "b", "c", "d"], ["a", "b"], ["c", "d"], ["c"], ["d"]]
    [record] = aws.dead_letters()
    assert record["DDBStreamBatchInfo"]["batchSize"] == 1


# --------------------------------------------------------------------------- moto servers


def _read_through_a_server(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    resources = make_resources()
    reader = StreamReader(streams_client(REGION), resources.stream_arn)
    resources.put("a", "QUEUED")
    resources.put("a", "DONE")

    records = reader.read()

    assert [r["eventName"] for r in records] == ["INSERT", "MODIFY"]


def test_the_integration_harness_moto_server_routes_streams_calls(
    moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    _read_through_a_server(moto_url, monkeypatch)


def test_the_local_stacks_moto_server_routes_streams_calls_and_delivers_promptly(
    monkeypatch: pytest.MonkeyPatch, sources: list[DynamoDbStreamSource]
) -> None:
    """Server mode: calls signed for "dynamodb" reach moto's Streams backend (X-Amz-Target)."""
    moto = MotoServer(0)  # a free port
    try:
        moto.wait_ready()
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        resources = make_resources()
        function = FakeFunction()
        source = run(
            sources,
            DynamoDbStreamSource(
                function=function,
                stream_arn=resources.stream_arn,
                filters=list(TRANSITIONS["Filters"]),
                endpoint_url=moto.url,
            ),
        )
        resources.put("a", "RUNNING")
        written = time.monotonic()
        resources.put("a", "DONE")

        wait_for(lambda: function.events, timeout=5, what="the transition delivered")

        assert function.batches() == [[("a", "DONE")]]
        # Polled four times a second: delivered within a poll or two of the write.
        assert function.invoked_at[0] - written < 1.5
    finally:
        for source in sources:
            source.stop()
        sources.clear()
        moto.stop()
