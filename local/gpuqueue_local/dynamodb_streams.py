"""Local DynamoDB Streams event source mapping: poll a table's stream, filter, batch, retry.

Like Lambda's stream pollers (one per shard, in order): a poll about four times a second
(GetRecords on every open shard, a parent shard drained before its children); records no
FilterCriteria pattern matches are dropped; the rest go to the function in batches of up to
BatchSize (gathered for at most MaximumBatchingWindowInSeconds). A batch is done when the
function succeeds; with ReportBatchItemFailures the response's lowest itemIdentifier is the
checkpoint and delivery resumes from that record (an empty or unknown identifier fails the
whole batch). A failed batch is retried after a short capped backoff (0.2 s doubling to 1 s;
Lambda's own waits are longer) until MaximumRetryAttempts, then skipped and, with an SQS
OnFailure destination, described there as Lambda describes it (DDBStreamBatchInfo).
BisectBatchOnFunctionError splits a batch whose invocation failed in two and retries each
half on its own, without spending the retry quota; a partial batch response with bisection
on retries only the records from the checkpoint on.

Not emulated: MaximumRecordAgeInSeconds, ParallelizationFactor, TumblingWindowInSeconds,
SNS/S3 OnFailure destinations, the 6 MB payload cap. The records read are held in memory
(no checkpoint survives a restart; the local stack's moto starts empty anyway). moto keeps
every shard iterator it hands out (about 1.3 kB a GetRecords, measured with moto 5.2.5):
polling four times a second grows the moto server by about 18 MB an hour.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from gpuqueue_local.event_sources import (
    REPORT_BATCH_ITEM_FAILURES,
    dynamodb_stream_event,
    filter_records,
    stream_batch_checkpoint,
    stream_batch_failure_record,
    stream_filters,
)
from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.s3_events import Invocable

# Lambda polls each shard four times a second.
DEFAULT_POLL_INTERVAL_S = 0.25
# First retry after 0.2 s, doubling, at most 1 s apart (locally short so tests stay quick).
DEFAULT_RETRY_BACKOFF_S = (0.2, 1.0)
GET_RECORDS_LIMIT = 1000  # GetRecords' maximum
MAX_PAGES_PER_READ = 10  # bounds one read: at most 10,000 records a shard
SHARD_REFRESH_S = 10.0  # DescribeStream again this often, for new (child) shards
STARTING_POSITIONS = ("TRIM_HORIZON", "LATEST")


def _key(credentials: Mapping[str, str] | None, name: str) -> str | None:
    """One of a function's keys (its execution role's, as Lambda's pollers use them); None:
    boto3 takes the process's own."""
    return (credentials or {}).get(name)


Log = Callable[[str], None]


def streams_client(
    region: str | None = None,
    *,
    endpoint_url: str | None = None,
    credentials: Mapping[str, str] | None = None,
) -> Any:
    """A DynamoDB Streams client that reaches moto, in-process (mock_aws) or as a server.

    botocore (1.44 here) resolves DynamoDB Streams calls for a stream ARN to an account-ID
    endpoint, https://<account>.streams-ddb.<region>.amazonaws.com, which moto's in-process
    mock does not route (404 "Not yet implemented"). account_id_endpoint_mode="disabled"
    makes it use the regional https://streams.dynamodb.<region>.amazonaws.com, which the
    mock routes (and AWS serves). With AWS_ENDPOINT_URL (or endpoint_url) the calls go to
    the moto server instead, and it dispatches them right although SigV4 names the service
    "dynamodb": it picks the Streams backend by the X-Amz-Target header
    (DynamoDBStreams_20120810.*). Checked with moto 5.2.5: DescribeStream, GetShardIterator
    and GetRecords through a moto server subprocess and a ThreadedMotoServer.
    """
    return boto3.client(
        "dynamodbstreams",
        region_name=region,
        endpoint_url=endpoint_url,
        aws_access_key_id=_key(credentials, "AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=_key(credentials, "AWS_SECRET_ACCESS_KEY"),
        config=Config(
            account_id_endpoint_mode="disabled",
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 2},
        ),
    )


class ShardReader(Protocol):
    def read_by_shard(self) -> list[tuple[str, list[dict[str, Any]]]]: ...


@dataclass
class _Shard:
    shard_id: str
    parent_id: str | None
    iterator: str | None = None
    last_sequence: str | None = None


class StreamReader:
    """Every record of a stream since the last read, shard by shard, in stream order.

    The starting position applies to the shards open when the reader is made (LATEST: what
    is written from now on); shards that appear later are read from their start. Taking
    the iterators happens here, so construct the reader before the writes it should see.
    """

    def __init__(
        self, client: Any, stream_arn: str, starting_position: str = "TRIM_HORIZON"
    ) -> None:
        if starting_position not in STARTING_POSITIONS:
            raise ValueError(f"StartingPosition must be one of {STARTING_POSITIONS}")
        self.client = client
        self.stream_arn = stream_arn
        self.starting_position = starting_position
        self._shards: dict[str, _Shard] = {}
        self._finished: set[str] = set()
        self._refreshed_at = 0.0
        self.refresh(initial=True)

    def read(self) -> list[dict[str, Any]]:
        """The records written since the last read (all shards, each in order)."""
        return [record for _, records in self.read_by_shard() for record in records]

    def read_by_shard(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """`read`, keeping each shard's records apart: [(shard id, records)]."""
        # Until a shard exists (moto makes the first on the first write), look every read:
        # otherwise the first records would wait a whole refresh period.
        if not self._shards or time.monotonic() - self._refreshed_at >= SHARD_REFRESH_S:
            self.refresh()
        batches = []
        for shard in list(self._shards.values()):
            if shard.parent_id in self._shards:
                continue  # the parent first: a key's older changes are in it
            records = self._read_shard(shard)
            if records:
                batches.append((shard.shard_id, records))
        return batches

    def refresh(self, *, initial: bool = False) -> None:
        """Learn the stream's shards (DescribeStream, paginated); new ones get an iterator."""
        start: str | None = None
        while True:
            kwargs: dict[str, Any] = {"StreamArn": self.stream_arn}
            if start:
                kwargs["ExclusiveStartShardId"] = start
            description = self.client.describe_stream(**kwargs)["StreamDescription"]
            for shard in description.get("Shards", []):
                shard_id = shard["ShardId"]
                if shard_id in self._shards or shard_id in self._finished:
                    continue
                state = _Shard(shard_id=shard_id, parent_id=shard.get("ParentShardId"))
                position = self.starting_position if initial else "TRIM_HORIZON"
                state.iterator = self._iterator(shard_id, position)
                self._shards[shard_id] = state
            start = description.get("LastEvaluatedShardId")
            if not start:
                break
        self._refreshed_at = time.monotonic()

    def _iterator(self, shard_id: str, position: str, sequence: str | None = None) -> str:
        kwargs: dict[str, Any] = {
            "StreamArn": self.stream_arn,
            "ShardId": shard_id,
            "ShardIteratorType": position,
        }
        if sequence is not None:
            kwargs["SequenceNumber"] = sequence
        return str(self.client.get_shard_iterator(**kwargs)["ShardIterator"])

    def _read_shard(self, shard: _Shard) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES_PER_READ):
            try:
                page = self.client.get_records(
                    ShardIterator=shard.iterator, Limit=GET_RECORDS_LIMIT
                )
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") != "ExpiredIteratorException":
                    raise
                # Iterators live 15 minutes on AWS: take a new one where this one stood.
                shard.iterator = (
                    self._iterator(shard.shard_id, "AFTER_SEQUENCE_NUMBER", shard.last_sequence)
                    if shard.last_sequence
                    else self._iterator(shard.shard_id, "TRIM_HORIZON")
                )
                continue
            got = page.get("Records", [])
            records.extend(got)
            if got:
                shard.last_sequence = str(got[-1]["dynamodb"]["SequenceNumber"])
            shard.iterator = page.get("NextShardIterator")
            if shard.iterator is None:  # a closed shard, read to its end
                del self._shards[shard.shard_id]
                self._finished.add(shard.shard_id)
                break
            if len(got) < GET_RECORDS_LIMIT:
                break
        return records


@dataclass
class DynamoDbStreamSource:
    """One function's DynamoDB event of the template, run against the local stream."""

    function: Invocable
    stream_arn: str
    function_name: str = ""  # for the functionArn of OnFailure records; default: the spec's
    batch_size: int = 100
    batching_window_seconds: float = 0.0
    starting_position: str = "TRIM_HORIZON"
    maximum_retry_attempts: int = -1  # -1: until it succeeds (AWS: until the record expires)
    bisect_on_function_error: bool = False
    report_batch_item_failures: bool = False
    filters: Sequence[Mapping[str, Any]] = ()  # FilterCriteria patterns (any one must match)
    on_failure_arn: str | None = None  # an SQS queue's ARN
    region: str = "us-east-1"
    endpoint_url: str | None = None
    # The function's keys: Lambda reads the stream and sends to OnFailure with its role.
    credentials: Mapping[str, str] = field(default_factory=dict)
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    retry_backoff_s: tuple[float, float] = DEFAULT_RETRY_BACKOFF_S  # (first, cap)
    log: Log | None = None
    # What reads the stream; None: a StreamReader made by start() (or the first poll).
    reader: ShardReader | None = None
    polls: int = 0
    invocations: int = 0
    delivered: int = 0  # records the function took (succeeded or checkpointed past)
    filtered_out: int = 0
    discarded: int = 0  # records skipped after MaximumRetryAttempts
    on_failure_sent: int = 0
    _pending: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    _first_pending_at: dict[str, float] = field(default_factory=dict)
    _sqs: Any = None
    _on_failure_url: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _enabled: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.filters = stream_filters(list(self.filters))  # fail at start-up, not per record
        if self.starting_position not in STARTING_POSITIONS:
            raise ValueError(f"StartingPosition must be one of {STARTING_POSITIONS}")
        if not self.function_name:
            spec = getattr(self.function, "spec", None)
            self.function_name = str(getattr(spec, "logical_id", "function"))
        self._enabled.set()

    @classmethod
    def from_event_properties(
        cls,
        properties: Mapping[str, Any],
        function: Invocable,
        *,
        function_name: str = "",
        region: str = "us-east-1",
        log: Log | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> DynamoDbStreamSource:
        """From a SAM `Type: DynamoDB` event's Properties, intrinsics already resolved."""
        on_failure = ((properties.get("DestinationConfig") or {}).get("OnFailure")) or {}
        destination = on_failure.get("Destination")
        if destination and str(on_failure.get("Type", "SQS")).upper() != "SQS":
            if log:
                kind = on_failure.get("Type")
                log(f"[ddb] OnFailure type {kind} is not emulated: skips are only logged")
            destination = None
        types = properties.get("FunctionResponseTypes") or []
        return cls(
            function=function,
            stream_arn=str(properties["Stream"]),
            function_name=function_name,
            batch_size=int(properties.get("BatchSize", 100)),
            batching_window_seconds=float(properties.get("MaximumBatchingWindowInSeconds", 0)),
            starting_position=str(properties.get("StartingPosition", "TRIM_HORIZON")),
            maximum_retry_attempts=int(properties.get("MaximumRetryAttempts", -1)),
            bisect_on_function_error=_flag(properties.get("BisectBatchOnFunctionError")),
            report_batch_item_failures=REPORT_BATCH_ITEM_FAILURES in types,
            filters=stream_filters(properties.get("FilterCriteria")),
            on_failure_arn=str(destination) if destination else None,
            region=region,
            credentials=dict(credentials or {}),
            log=log,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Take the shard iterators now (LATEST: what is written from here on), then poll."""
        try:
            self._stream_reader()
        except Exception as error:  # the loop tries again
            self._report(f"[ddb] reading {self.stream_arn} failed: {error}")
        self._thread = threading.Thread(
            target=self._loop, daemon=True, name=f"ddb-stream-{self.function_name}"
        )
        self._thread.start()

    def pause(self) -> None:
        """Like `Enabled: false`: the batch under way finishes (or waits out a retry), no polls."""
        self._enabled.clear()

    def resume(self) -> None:
        self._enabled.set()

    def stopping(self) -> None:
        """No new reads or invocations (what is under way goes on); `stop` then waits."""
        self._stop.set()
        self._enabled.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling; an invocation under way finishes (bounded by the function's Timeout)."""
        self.stopping()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    @property
    def idle(self) -> bool:
        """Nothing read and waiting to be delivered."""
        return not any(list(self._pending.values()))  # list(): one step under the GIL

    # ------------------------------------------------------------------ polling

    def poll_once(self) -> int:
        """One poll, then every batch it made ready delivered (retries and all).

        What the poller thread does about four times a second; callable without start() for
        a test that pumps the stream itself. Returns the number of batches started.
        """
        self._read()
        batches = 0
        for shard_id, pending in list(self._pending.items()):
            if self._stop.is_set() or not self._enabled.is_set():
                break
            if self._ready(shard_id, pending):
                batches += 1
                self._deliver(shard_id, pending)
        return batches

    def _loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            if not self._enabled.wait(timeout=0.5):
                continue
            try:
                batches = self.poll_once()
                failing = False
            except Exception as error:  # the poller outlives moto hiccups and bad batches
                if not failing:  # once per outage, not four times a second
                    self._report(f"[ddb] polling {self.stream_arn} failed: {error}")
                failing = True
                self._stop.wait(1.0)
                continue
            if not batches:
                self._stop.wait(self.poll_interval_s)

    def _stream_reader(self) -> ShardReader:
        if self.reader is None:
            client = streams_client(
                self.region, endpoint_url=self.endpoint_url, credentials=self.credentials
            )
            self.reader = StreamReader(client, self.stream_arn, self.starting_position)
        return self.reader

    def _read(self) -> None:
        waiting = [len(p) for p in self._pending.values() if p]
        if waiting and min(waiting) >= self.batch_size:
            return  # every shard with records has a full batch waiting: read later
        for shard_id, records in self._stream_reader().read_by_shard():
            wanted = filter_records(
                self.filters, records, stream_arn=self.stream_arn, region=self.region
            )
            self.filtered_out += len(records) - len(wanted)
            if wanted:
                pending = self._pending.setdefault(shard_id, deque())
                if not pending:
                    self._first_pending_at[shard_id] = time.monotonic()
                pending.extend(wanted)
        self.polls += 1

    def _ready(self, shard_id: str, pending: deque[dict[str, Any]]) -> bool:
        if not pending:
            return False
        if len(pending) >= self.batch_size or self.batching_window_seconds <= 0:
            return True
        waited = time.monotonic() - self._first_pending_at.get(shard_id, 0.0)
        return waited >= self.batching_window_seconds

    # ------------------------------------------------------------------ delivery

    def _deliver(self, shard_id: str, pending: deque[dict[str, Any]]) -> None:
        """One batch from the head of a shard, through retries and bisection, to its end.

        `plan` holds the sizes of the batches still to run from the head: one batch of up
        to BatchSize, split in two each time bisection applies.
        """
        plan = [min(self.batch_size, len(pending))]
        retries = 0  # failed attempts of the batch at plan[0] that count against the quota
        invokes = 0  # invocations that batch has had (approximateInvokeCount)
        while plan and not self._stop.is_set():
            size = plan[0]
            batch = [pending[i] for i in range(size)]
            result = self._invoke(batch)
            invokes += 1
            done = (
                stream_batch_checkpoint(
                    batch,
                    result.payload,
                    report_batch_item_failures=self.report_batch_item_failures,
                )
                if result.ok
                else 0
            )
            self._take(pending, done)
            if done == size:
                plan.pop(0)
                retries = invokes = 0
                continue
            if not result.ok and self.bisect_on_function_error and size > 1:
                plan[0:1] = [size - size // 2, size // 2]  # splitting spends no retry
                self._report(
                    f"[ddb] batch of {size} failed ({_reason(result)}); "
                    f"bisecting into {plan[0]} + {plan[1]}"
                )
                retries = invokes = 0
                continue
            if done:  # checkpointed: the rest is retried from the first failed record on
                retries = invokes = 1
                plan[0] = size - done if self.bisect_on_function_error else self._refill(pending)
            else:
                retries += 1
            if 0 <= self.maximum_retry_attempts < retries:
                self._discard(shard_id, pending, plan.pop(0), invokes, result)
                retries = invokes = 0
                continue
            delay = min(self.retry_backoff_s[1], self.retry_backoff_s[0] * 2 ** (retries - 1))
            self._report(
                f"[ddb] {plan[0]} record(s) failed ({_reason(result)}); "
                f"retry {retries} in {delay:.1f}s"
            )
            if self._stop.wait(delay) or not self._enabled.is_set():
                return  # stopped or paused: the records stay at the head of the shard

    def _refill(self, pending: deque[dict[str, Any]]) -> int:
        return min(self.batch_size, len(pending))

    def _invoke(self, batch: list[dict[str, Any]]) -> InvocationResult:
        event = dynamodb_stream_event(batch, self.stream_arn, self.region)
        self.invocations += 1
        try:
            return self.function.invoke(event)
        except Exception as error:  # a target that raises is a failed invocation, not a crash
            return InvocationResult(
                ok=False, error_type=type(error).__name__, error_message=str(error)
            )

    def _take(self, pending: deque[dict[str, Any]], count: int) -> None:
        for _ in range(count):
            pending.popleft()
        self.delivered += count

    def _discard(
        self,
        shard_id: str,
        pending: deque[dict[str, Any]],
        size: int,
        invokes: int,
        result: InvocationResult,
    ) -> None:
        batch = [pending.popleft() for _ in range(size)]
        self.discarded += size
        first = batch[0]["dynamodb"]["SequenceNumber"]
        last = batch[-1]["dynamodb"]["SequenceNumber"]
        where = f"{size} record(s) {first}..{last} of {shard_id}"
        if not self.on_failure_arn:
            self._report(f"[ddb] retries exhausted: skipping {where} (no OnFailure destination)")
            return
        record = stream_batch_failure_record(
            batch,
            shard_id=shard_id,
            stream_arn=self.stream_arn,
            function_arn=self._function_arn(),
            invoke_count=invokes,
            function_error=None if result.ok else "Unhandled",
        )
        try:
            self._sqs_client().send_message(
                QueueUrl=self._queue_url(self.on_failure_arn), MessageBody=json.dumps(record)
            )
        except Exception as error:
            self._report(f"[ddb] retries exhausted: skipping {where}; OnFailure failed: {error}")
            return
        self.on_failure_sent += 1
        self._report(
            f"[ddb] retries exhausted: skipping {where}, described to {self.on_failure_arn}"
        )

    def _function_arn(self) -> str:
        account = self.stream_arn.split(":")[4] if self.stream_arn.count(":") >= 5 else ""
        return f"arn:aws:lambda:{self.region}:{account}:function:{self.function_name}"

    def _sqs_client(self) -> Any:
        if self._sqs is None:
            self._sqs = boto3.client(
                "sqs",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=_key(self.credentials, "AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=_key(self.credentials, "AWS_SECRET_ACCESS_KEY"),
                config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}),
            )
        return self._sqs

    def _queue_url(self, arn: str) -> str:
        if self._on_failure_url is None:
            _, _, _, _, account, name = arn.split(":", 5)
            # The operator's keys: Lambda knows the destination's URL, the role needs no
            # sqs:GetQueueUrl for it.
            operator = boto3.client("sqs", region_name=self.region, endpoint_url=self.endpoint_url)
            self._on_failure_url = str(
                operator.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
            )
        return self._on_failure_url

    def _report(self, message: str) -> None:
        if self.log:
            self.log(message)


def _reason(result: InvocationResult) -> str:
    if result.ok:
        return "partial batch failure"
    return f"{result.error_type}: {result.error_message}"


def _flag(value: Any) -> bool:
    return str(value).lower() == "true"
