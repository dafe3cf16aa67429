"""DynamoDB Streams for the local stack: Lambda's event, filters, checkpoints and batching.

The source is driven synchronously here (`poll_once` over a scripted reader), so batching,
partial batch responses, retries and bisection are checked without moto or threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from gpuqueue_local.dynamodb_streams import DynamoDbStreamSource
from gpuqueue_local.event_patterns import UnsupportedPattern
from gpuqueue_local.event_sources import (
    dynamodb_stream_event,
    filter_records,
    stream_batch_checkpoint,
    stream_batch_failure_record,
    stream_filters,
)
from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.provision import LocalStack
from gpuqueue_local.stack import LogPrinter, stream_event_sources
from gpuqueue_local.template import Resolver

REGION = "eu-west-1"
STREAM_ARN = "arn:aws:dynamodb:eu-west-1:123456789012:table/tasks/stream/2026-01-27T10:00:00.000"
QUEUE_ARN = "arn:aws:sqs:eu-west-1:123456789012:task-events-dlq"
SHARD = "shardId-00000001541626099285-f35f62ef"
FINISHED = ["DONE", "FAILED", "CANCELED", "EXPIRED"]
# The pattern template.yaml's TaskTransitions event has: a task reaching a final state.
TRANSITION_PATTERN = json.dumps(
    {
        "eventName": ["MODIFY"],
        "dynamodb": {
            "NewImage": {"status": {"S": FINISHED}},
            "OldImage": {"status": {"S": [{"anything-but": FINISHED}]}},
        },
    }
)
CRITERIA = {"Filters": [{"Pattern": TRANSITION_PATTERN}]}
CREATED = datetime(2026, 1, 27, 10, 0, 5, 750_000, tzinfo=UTC)


def raw(
    seq: int,
    event_name: str = "MODIFY",
    *,
    old: str | None = "RUNNING",
    new: str | None = "DONE",
    task: str = "t1",
) -> dict[str, Any]:
    """A GetRecords record as boto3 returns it (a datetime, DynamoDB JSON images)."""
    body: dict[str, Any] = {
        "ApproximateCreationDateTime": CREATED,
        "Keys": {"task_id": {"S": task}},
        "SequenceNumber": str(seq),
        "SizeBytes": 42,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if event_name != "INSERT" and old is not None:
        body["OldImage"] = {"task_id": {"S": task}, "status": {"S": old}}
    if event_name != "REMOVE" and new is not None:
        body["NewImage"] = {"task_id": {"S": task}, "status": {"S": new}}
    return {
        "eventID": f"id-{seq}",
        "eventName": event_name,
        "eventVersion": "1.0",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": body,
    }


# --------------------------------------------------------------------------- the event


def test_the_event_has_lambdas_shape_for_a_stream_record() -> None:
    event = dynamodb_stream_event([raw(7, old="RUNNING", new="DONE")], STREAM_ARN, REGION)

    [record] = event["Records"]
    assert list(record) == [
        "eventID",
        "eventName",
        "eventVersion",
        "eventSource",
        "awsRegion",
        "dynamodb",
        "eventSourceARN",
    ]
    assert record["eventID"] == "id-7"
    assert record["eventName"] == "MODIFY"
    assert record["eventVersion"] == "1.1"
    assert record["eventSource"] == "aws:dynamodb"
    assert record["awsRegion"] == REGION  # the mapping's region, not moto's "us-east-1"
    assert record["eventSourceARN"] == STREAM_ARN
    assert record["dynamodb"] == {
        "ApproximateCreationDateTime": int(CREATED.timestamp()),  # epoch seconds, rounded down
        "Keys": {"task_id": {"S": "t1"}},
        "NewImage": {"task_id": {"S": "t1"}, "status": {"S": "DONE"}},
        "OldImage": {"task_id": {"S": "t1"}, "status": {"S": "RUNNING"}},
        "SequenceNumber": "7",
        "SizeBytes": 42,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    json.dumps(event)  # what the worker process receives


def test_insert_has_no_old_image_and_remove_no_new_image() -> None:
    event = dynamodb_stream_event([raw(1, "INSERT"), raw(2, "REMOVE")], STREAM_ARN, REGION)

    insert, remove = (r["dynamodb"] for r in event["Records"])
    assert "OldImage" not in insert
    assert "NewImage" in insert
    assert "NewImage" not in remove
    assert "OldImage" in remove


def test_binary_attributes_are_base64_at_any_depth_and_numbers_stay_strings() -> None:
    record = raw(1)
    record["dynamodb"]["NewImage"] = {
        "blob": {"B": b"\x00\x01png"},
        "blobs": {"BS": [b"a", b"b"]},
        "nested": {"M": {"inner": {"B": b"xyz"}, "list": {"L": [{"B": b"q"}, {"N": "5"}]}}},
        "count": {"N": "12"},
    }

    image = dynamodb_stream_event([record], STREAM_ARN, REGION)["Records"][0]["dynamodb"][
        "NewImage"
    ]

    assert image == {
        "blob": {"B": "AAFwbmc="},
        "blobs": {"BS": ["YQ==", "Yg=="]},
        "nested": {"M": {"inner": {"B": "eHl6"}, "list": {"L": [{"B": "cQ=="}, {"N": "5"}]}}},
        "count": {"N": "12"},
    }


def test_a_record_already_in_the_events_shape_comes_out_the_same() -> None:
    event = dynamodb_stream_event([raw(3)], STREAM_ARN, REGION)

    again = dynamodb_stream_event(event["Records"], STREAM_ARN, REGION)

    assert again == event


def test_a_ttl_deletion_keeps_its_user_identity() -> None:
    record = raw(4, "REMOVE")
    record["userIdentity"] = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}

    [shaped] = dynamodb_stream_event([record], STREAM_ARN, REGION)["Records"]

    assert shaped["userIdentity"] == record["userIdentity"]


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("record", "delivered"),
    [
        (raw(1, old="RUNNING", new="DONE"), True),
        (raw(1, old="QUEUED", new="CANCELED"), True),
        (raw(1, old="RUNNING", new="FAILED"), True),
        (raw(1, old="QUEUED", new="EXPIRED"), True),
        (raw(1, old="DONE", new="DONE"), False),  # anything-but on OldImage: already final
        (raw(1, old="FAILED", new="CANCELED"), False),
        (raw(1, old="QUEUED", new="RUNNING"), False),  # not final
        (raw(1, "INSERT", new="DONE"), False),  # eventName MODIFY only
        (raw(1, "REMOVE", old="RUNNING"), False),
        (raw(1, old=None, new="DONE"), False),  # no OldImage status: anything-but needs one
    ],
)
def test_the_transition_filter_lets_through_only_a_task_reaching_a_final_state(
    record: dict[str, Any], delivered: bool
) -> None:
    assert filter_records(CRITERIA, [record]) == ([record] if delivered else [])


def test_a_record_passes_when_any_filter_matches_and_order_is_kept() -> None:
    filters = [
        {"Pattern": json.dumps({"eventName": ["INSERT"]})},
        {"Pattern": json.dumps({"dynamodb": {"Keys": {"task_id": {"S": [{"prefix": "b"}]}}}})},
    ]
    records = [
        raw(1, "INSERT", task="a1"),
        raw(2, task="a2"),
        raw(3, task="b3"),
        raw(4, "REMOVE", task="c4"),
        raw(5, "INSERT", task="b5"),
    ]

    passed = filter_records(filters, records)

    assert [r["dynamodb"]["SequenceNumber"] for r in passed] == ["1", "3", "5"]
    assert passed[0] is records[0]  # the records themselves, for the event built later


def test_no_filters_let_everything_through() -> None:
    records = [raw(1), raw(2, "INSERT"), raw(3, "REMOVE")]

    assert filter_records(None, records) == records
    assert filter_records({"Filters": []}, records) == records


def test_filters_may_be_the_criteria_the_filter_list_or_bare_patterns() -> None:
    pattern = json.loads(TRANSITION_PATTERN)

    forms = [
        CRITERIA,
        CRITERIA["Filters"],
        [TRANSITION_PATTERN],
        [pattern],
        pattern,
        TRANSITION_PATTERN,
    ]

    assert all(stream_filters(form) == [pattern] for form in forms)


def test_filters_can_match_the_events_source_fields() -> None:
    filters = [json.dumps({"awsRegion": [REGION], "eventSourceARN": [{"prefix": "arn:aws:"}]})]

    assert filter_records(filters, [raw(1)], stream_arn=STREAM_ARN, region=REGION)
    assert not filter_records(filters, [raw(1)], stream_arn=STREAM_ARN, region="us-west-2")


@pytest.mark.parametrize(
    "pattern",
    [
        '{"dynamodb": {"NewImage": {"n": {"N": [{"numeric": [">", 5]}]}}}}',
        '{"$or": [{"eventName": ["INSERT"]}, {"eventName": ["REMOVE"]}]}',
        '{"eventName": "MODIFY"}',  # a leaf must be an array
        "not json",
        "[1, 2]",
    ],
)
def test_a_pattern_the_matcher_cannot_honour_fails_at_once(pattern: str) -> None:
    with pytest.raises(UnsupportedPattern):
        stream_filters({"Filters": [{"Pattern": pattern}]})


# --------------------------------------------------------------------------- checkpoints

BATCH = [raw(seq) for seq in (8, 9, 10, 11)]


@pytest.mark.parametrize(
    ("response", "done"),
    [
        (None, 4),
        ({}, 4),
        ({"batchItemFailures": []}, 4),
        ({"batchItemFailures": None}, 4),
        ("a string", 4),
        ({"batchItemFailures": [{"itemIdentifier": "10"}]}, 2),
        ({"batchItemFailures": [{"itemIdentifier": "11"}, {"itemIdentifier": "9"}]}, 1),
        ({"batchItemFailures": [{"itemIdentifier": "10"}, {"itemIdentifier": "8"}]}, 0),
        ({"batchItemFailures": [{"itemIdentifier": ""}]}, 0),
        ({"batchItemFailures": [{"itemIdentifier": None}]}, 0),
        ({"batchItemFailures": [{}]}, 0),
        ({"batchItemFailures": [{"itemIdentifier": "999"}]}, 0),
        ({"batchItemFailures": [{"itemIdentifier": "11"}, {"itemIdentifier": "x"}]}, 0),
        ({"batchItemFailures": "10"}, 0),
    ],
)
def test_the_checkpoint_is_the_lowest_reported_sequence_number(response: Any, done: int) -> None:
    """Numeric order ("9" < "10"); an empty, null or unknown identifier fails it all."""
    assert stream_batch_checkpoint(BATCH, response) == done


def test_without_report_batch_item_failures_a_response_is_ignored() -> None:
    response = {"batchItemFailures": [{"itemIdentifier": "8"}]}

    assert stream_batch_checkpoint(BATCH, response, report_batch_item_failures=False) == 4


def test_the_on_failure_record_describes_the_skipped_batch_as_lambda_does() -> None:
    record = stream_batch_failure_record(
        BATCH[1:],
        shard_id=SHARD,
        stream_arn=STREAM_ARN,
        function_arn="arn:aws:lambda:eu-west-1:123456789012:function:TaskEventsFunction",
        invoke_count=11,
    )

    assert set(record) == {
        "requestContext",
        "responseContext",
        "version",
        "timestamp",
        "DDBStreamBatchInfo",
    }
    assert record["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 11
    assert record["requestContext"]["functionArn"].endswith(":function:TaskEventsFunction")
    assert record["responseContext"] == {
        "statusCode": 200,
        "executedVersion": "$LATEST",
        "functionError": "Unhandled",
    }
    assert record["version"] == "1.0"
    assert datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert record["DDBStreamBatchInfo"] == {
        "shardId": SHARD,
        "startSequenceNumber": "9",
        "endSequenceNumber": "11",
        "approximateArrivalOfFirstRecord": "2026-01-27T10:00:05Z",
        "approximateArrivalOfLastRecord": "2026-01-27T10:00:05Z",
        "batchSize": 3,
        "streamArn": STREAM_ARN,
    }


# --------------------------------------------------------------------------- the template


def test_the_event_properties_become_the_sources_settings() -> None:
    properties = {
        "Stream": STREAM_ARN,
        "StartingPosition": "TRIM_HORIZON",
        "BatchSize": 100,
        "MaximumBatchingWindowInSeconds": 0,
        "MaximumRetryAttempts": 10,
        "BisectBatchOnFunctionError": True,
        "FunctionResponseTypes": ["ReportBatchItemFailures"],
        "FilterCriteria": CRITERIA,
        "DestinationConfig": {"OnFailure": {"Type": "SQS", "Destination": QUEUE_ARN}},
    }

    source = DynamoDbStreamSource.from_event_properties(
        properties, ScriptedFunction(), function_name="TaskEventsFunction", region=REGION
    )

    assert source.stream_arn == STREAM_ARN
    assert source.batch_size == 100
    assert source.batching_window_seconds == 0
    assert source.starting_position == "TRIM_HORIZON"
    assert source.maximum_retry_attempts == 10
    assert source.bisect_on_function_error is True
    assert source.report_batch_item_failures is True
    assert source.filters == [json.loads(TRANSITION_PATTERN)]
    assert source.on_failure_arn == QUEUE_ARN
    assert source.region == REGION


def test_lambdas_defaults_apply_to_what_the_event_leaves_out() -> None:
    source = DynamoDbStreamSource.from_event_properties(
        {"Stream": STREAM_ARN, "StartingPosition": "LATEST"}, ScriptedFunction()
    )

    assert source.batch_size == 100
    assert source.maximum_retry_attempts == -1
    assert source.bisect_on_function_error is False
    assert source.report_batch_item_failures is False
    assert source.filters == []
    assert source.on_failure_arn is None


def _stack(events: dict[str, Any]) -> LocalStack:
    template = {
        "Resources": {
            "TasksTable": {"Type": "AWS::DynamoDB::Table", "Properties": {}},
            "EventsFunction": {
                "Type": "AWS::Serverless::Function",
                "Properties": {"Handler": "h.handler", "CodeUri": "x", "Events": events},
            },
        }
    }
    resolver = Resolver(
        parameters={},
        pseudo={},
        attributes={("TasksTable", "StreamArn"): STREAM_ARN, ("Dlq", "Arn"): QUEUE_ARN},
    )
    return LocalStack(name="s", region=REGION, template=template, resolver=resolver)


def test_the_stacks_dynamodb_events_become_sources_and_disabled_ones_are_skipped() -> None:
    stream = {"Fn::GetAtt": ["TasksTable", "StreamArn"]}
    stack = _stack(
        {
            "On": {
                "Type": "DynamoDB",
                "Properties": {
                    "Stream": stream,
                    "StartingPosition": "LATEST",
                    "DestinationConfig": {
                        "OnFailure": {"Type": "SQS", "Destination": {"Fn::GetAtt": "Dlq.Arn"}}
                    },
                },
            },
            "Off": {
                "Type": "DynamoDB",
                "Properties": {"Stream": stream, "StartingPosition": "LATEST", "Enabled": False},
            },
            "Queue": {"Type": "SQS", "Properties": {"Queue": "whatever"}},
        }
    )
    function = ScriptedFunction()

    functions: dict[str, Any] = {"EventsFunction": function}  # a FunctionRuntime stand-in

    sources = stream_event_sources(stack, functions, LogPrinter(quiet=True), REGION)

    [source] = sources
    assert source.function is function
    assert source.function_name == "EventsFunction"
    assert source.stream_arn == STREAM_ARN
    assert source.starting_position == "LATEST"
    assert source.on_failure_arn == QUEUE_ARN


def test_a_stack_without_dynamodb_events_has_no_stream_sources() -> None:
    stack = _stack({"Queue": {"Type": "SQS", "Properties": {"Queue": "whatever"}}})

    assert stream_event_sources(stack, {}, LogPrinter(quiet=True), REGION) == []


# --------------------------------------------------------------------------- delivery


@dataclass
class ScriptedReader:
    """Hands out the records queued on it, as a StreamReader hands out new ones."""

    queued: list[dict[str, Any]] = field(default_factory=list)

    def read_by_shard(self) -> list[tuple[str, list[dict[str, Any]]]]:
        records, self.queued = self.queued, []
        return [(SHARD, records)] if records else []


@dataclass
class ScriptedFunction:
    """Records each batch's sequence numbers; `answer` decides each invocation's result."""

    answer: Any = None  # (sequence numbers, call number) -> InvocationResult | None
    batches: list[list[str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        numbers = [r["dynamodb"]["SequenceNumber"] for r in event["Records"]]
        self.batches.append(numbers)
        self.events.append(event)
        result = self.answer(numbers, len(self.batches)) if self.answer else None
        return result or InvocationResult(ok=True, payload=None)


def fails(*sequence_numbers: int) -> Any:
    """A handler reporting these records failed (partial batch response) every time."""

    def answer(numbers: list[str], _: int) -> InvocationResult:
        failed = [{"itemIdentifier": n} for n in numbers if int(n) in sequence_numbers]
        return InvocationResult(ok=True, payload={"batchItemFailures": failed})

    return answer


def raises_on(*sequence_numbers: int) -> Any:
    """A handler that errors whenever its batch holds one of these records."""

    def answer(numbers: list[str], _: int) -> InvocationResult | None:
        if any(int(n) in sequence_numbers for n in numbers):
            return InvocationResult(ok=False, error_type="ValueError", error_message="poison")
        return None

    return answer


def source_for(
    function: ScriptedFunction, records: list[dict[str, Any]], **settings: Any
) -> DynamoDbStreamSource:
    return DynamoDbStreamSource(
        function=function,
        stream_arn=STREAM_ARN,
        region=REGION,
        reader=ScriptedReader(records),
        retry_backoff_s=(0.0, 0.0),
        **settings,
    )


def pump(source: DynamoDbStreamSource, polls: int = 10) -> None:
    for _ in range(polls):
        if not source.poll_once() and source.idle:
            return


def test_records_go_out_in_order_in_batches_of_batch_size() -> None:
    function = ScriptedFunction()
    source = source_for(function, [raw(n) for n in range(1, 251)], batch_size=100)

    pump(source)

    assert [len(b) for b in function.batches] == [100, 100, 50]
    assert [int(n) for b in function.batches for n in b] == list(range(1, 251))
    assert function.events[0]["Records"][0]["eventSourceARN"] == STREAM_ARN
    assert source.delivered == 250


def test_filtered_out_records_never_reach_the_function_nor_count_in_a_batch() -> None:
    function = ScriptedFunction()
    records = [raw(n, old="RUNNING", new="DONE" if n % 3 == 0 else "RUNNING") for n in range(1, 31)]
    source = source_for(function, records, batch_size=4, filters=stream_filters(CRITERIA))

    pump(source)

    assert function.batches == [["3", "6", "9", "12"], ["15", "18", "21", "24"], ["27", "30"]]
    assert source.filtered_out == 20


def test_a_batching_window_waits_for_a_fuller_batch() -> None:
    function = ScriptedFunction()
    reader = ScriptedReader([raw(1), raw(2)])
    source = DynamoDbStreamSource(
        function=function,
        stream_arn=STREAM_ARN,
        reader=reader,
        batch_size=3,
        batching_window_seconds=60,
    )

    assert source.poll_once() == 0  # two of three records, the window still open
    reader.queued = [raw(3), raw(4)]
    assert source.poll_once() == 1  # full: goes at once

    assert function.batches == [["1", "2", "3"]]


def test_a_partial_batch_failure_resumes_at_the_first_failed_record() -> None:
    function = ScriptedFunction(answer=None)
    first_time = fails(3, 4)
    function.answer = lambda numbers, call: first_time(numbers, call) if call == 1 else None
    source = source_for(function, [raw(n) for n in range(1, 7)], report_batch_item_failures=True)

    pump(source)

    assert function.batches == [["1", "2", "3", "4", "5", "6"], ["3", "4", "5", "6"]]


def test_after_a_checkpoint_the_retry_is_read_from_there_up_to_batch_size() -> None:
    """Without bisection the retry is a fresh read from the checkpoint, as Lambda's is."""
    function = ScriptedFunction()
    first_time = fails(2)
    function.answer = lambda numbers, call: first_time(numbers, call) if call == 1 else None
    source = source_for(
        function, [raw(n) for n in range(1, 9)], batch_size=3, report_batch_item_failures=True
    )

    pump(source)

    assert function.batches == [["1", "2", "3"], ["2", "3", "4"], ["5", "6", "7"], ["8"]]


def test_a_bad_identifier_retries_the_whole_batch() -> None:
    function = ScriptedFunction()
    bad = InvocationResult(ok=True, payload={"batchItemFailures": [{"itemIdentifier": ""}]})
    function.answer = lambda numbers, call: bad if call == 1 else None
    source = source_for(function, [raw(1), raw(2)], report_batch_item_failures=True)

    pump(source)

    assert function.batches == [["1", "2"], ["1", "2"]]


def test_partial_responses_are_ignored_without_report_batch_item_failures() -> None:
    function = ScriptedFunction(answer=fails(1))
    source = source_for(function, [raw(1), raw(2)], report_batch_item_failures=False)

    pump(source)

    assert function.batches == [["1", "2"]]


def test_a_failing_batch_is_retried_then_skipped_after_maximum_retry_attempts() -> None:
    function = ScriptedFunction(answer=raises_on(2))
    source = source_for(function, [raw(1), raw(2), raw(3), raw(4)], batch_size=2)
    source.maximum_retry_attempts = 2
    lines: list[str] = []
    source.log = lines.append

    pump(source)

    assert function.batches == [["1", "2"]] * 3 + [["3", "4"]]  # 1 attempt + 2 retries
    assert source.discarded == 2
    assert any("skipping 2 record(s) 1..2" in line for line in lines)


def test_a_record_that_keeps_failing_in_a_partial_response_is_skipped_with_its_batch() -> None:
    function = ScriptedFunction(answer=fails(2))
    source = source_for(
        function,
        [raw(1), raw(2), raw(3)],
        report_batch_item_failures=True,
        maximum_retry_attempts=1,
    )

    pump(source)

    assert function.batches == [["1", "2", "3"], ["2", "3"]]
    assert source.discarded == 2  # records 2 and 3, the batch retried from the checkpoint


def test_bisection_isolates_a_poison_record() -> None:
    function = ScriptedFunction(answer=raises_on(6))
    source = source_for(
        function,
        [raw(n) for n in range(1, 9)],
        bisect_on_function_error=True,
        maximum_retry_attempts=1,
    )

    pump(source)

    assert function.batches == [
        ["1", "2", "3", "4", "5", "6", "7", "8"],
        ["1", "2", "3", "4"],
        ["5", "6", "7", "8"],
        ["5", "6"],
        ["5"],
        ["6"],
        ["6"],  # the one retry MaximumRetryAttempts allows (splitting spent none)
        ["7", "8"],
    ]
    assert source.discarded == 1


def test_with_bisection_a_partial_response_retries_only_the_rest_of_the_batch() -> None:
    function = ScriptedFunction()
    first_time = fails(2)
    function.answer = lambda numbers, call: first_time(numbers, call) if call == 1 else None
    source = source_for(
        function,
        [raw(n) for n in range(1, 9)],
        batch_size=3,
        report_batch_item_failures=True,
        bisect_on_function_error=True,
    )

    pump(source)

    assert function.batches == [["1", "2", "3"], ["2", "3"], ["4", "5", "6"], ["7", "8"]]


def test_a_function_that_raises_is_a_failed_invocation() -> None:
    class Exploding(ScriptedFunction):
        def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
            super().invoke(event)
            raise RuntimeError("worker pool gone")

    function = Exploding()
    source = source_for(function, [raw(1)], maximum_retry_attempts=0)

    pump(source)

    assert function.batches == [["1"]]
    assert source.discarded == 1


def test_a_paused_source_delivers_nothing_until_resumed() -> None:
    function = ScriptedFunction()
    source = source_for(function, [raw(1)])

    source.pause()
    source.poll_once()
    assert function.batches == []

    source.resume()
    source.poll_once()
    assert function.batches == [["1"]]
