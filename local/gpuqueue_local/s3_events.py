"""Local S3 -> EventBridge -> Lambda: "Object Created" events for the template's rules.

On AWS a bucket with `NotificationConfiguration.EventBridgeConfiguration.EventBridgeEnabled`
sends every object change to the default event bus, and an `EventBridgeRule` event of a
function invokes it asynchronously for each event its pattern matches. moto can route such
events only to its own targets (SQS, logs), never to local workers, so here a poller per
bucket lists it (ListObjectsV2, paginated,
narrowed to the prefix the rules ask for), turns each new or changed object (key, ETag and
LastModified, so an identical re-upload counts as S3 counts it) into the event S3 would
send, and hands it to every rule whose pattern matches. Objects already there when the
poller starts are not events; a deleted and re-created key is. Polling sees states, not
writes: two writes to one key between polls are one event, an object created and deleted
between polls is none, and moto's LastModified has whole seconds, so an identical
re-upload within the same second goes unnoticed.

Delivery has Lambda's asynchronous-invoke semantics: the poller never waits on the
function; a failed invocation (error, timeout, crash) is logged and retried twice, after a
delay (1 and 2 s here; AWS waits about 1 and 2 minutes), then dropped with a log line.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.config import Config

from gpuqueue_local.event_patterns import UnsupportedPattern, matches, validate_pattern
from gpuqueue_local.event_patterns import matches_validated as _matches
from gpuqueue_local.lambda_runtime import InvocationResult

if TYPE_CHECKING:
    from gpuqueue_local.provision import LocalStack

ACCOUNT_ID = "123456789012"
S3_SOURCE = "aws.s3"
OBJECT_CREATED = "Object Created"
# EventBridgeRule is SAM's event type; CloudWatchEvent is its older name, same shape.
RULE_EVENT_TYPES = ("EventBridgeRule", "CloudWatchEvent")
DEFAULT_POLL_INTERVAL_S = 0.2
# Lambda retries a failed asynchronous invocation twice (after ~1 and ~2 minutes).
DEFAULT_RETRY_DELAYS_S = (1.0, 2.0)
LOCAL_ASYNC_CONCURRENCY = 4

Log = Callable[[str], None]

__all__ = [
    "ACCOUNT_ID",
    "DEFAULT_POLL_INTERVAL_S",
    "DEFAULT_RETRY_DELAYS_S",
    "LOCAL_ASYNC_CONCURRENCY",
    "OBJECT_CREATED",
    "RULE_EVENT_TYPES",
    "S3_SOURCE",
    "AsyncInvoker",
    "BucketPoller",
    "Invocable",
    "Log",
    "S3EventBridge",
    "S3Object",
    "S3Rule",
    # The matcher lives in event_patterns (DynamoDB Streams filters use it too); its
    # public names stay importable from here.
    "UnsupportedPattern",
    "common_prefix",
    "eventbridge_buckets",
    "exact_strings",
    "is_s3_object_created",
    "listing_prefix",
    "matches",
    "object_created_event",
    "template_rules",
    "validate_pattern",
]


# --------------------------------------------------------------------------- patterns


def exact_strings(entries: Any) -> list[str] | None:
    """The leaf's values when they are all exact strings, else None."""
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return None
    return list(entries)


def listing_prefix(entries: Any) -> str:
    """The longest S3 prefix every object a key filter can match starts with ("" = any)."""
    if not isinstance(entries, list) or not entries:
        return ""
    starts = []
    for entry in entries:
        if isinstance(entry, str):
            starts.append(entry)
        elif isinstance(entry, Mapping) and set(entry) == {"prefix"}:
            starts.append(str(entry["prefix"]))
        else:
            return ""  # suffix, anything-but, ...: the whole bucket is a candidate
    return common_prefix(starts)


def common_prefix(texts: Iterable[str]) -> str:
    """The longest string every text starts with (character-wise, as S3 prefixes are)."""
    items = list(texts)
    if not items:
        return ""
    shortest, longest = min(items), max(items)
    for index, char in enumerate(shortest):
        if char != longest[index]:
            return shortest[:index]
    return shortest


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    size: int
    etag: str  # without S3's quotes, as the event carries it
    last_modified: datetime

    @property
    def version(self) -> tuple[str, datetime]:
        return self.etag, self.last_modified


_sequence = itertools.count(1)


def _sequencer() -> str:
    # S3's sequencer: hex, increasing for writes to one key; compare after zero-padding.
    return f"{time.time_ns() // 1000:014X}{next(_sequence) % 0x10000:04X}"


def object_created_event(
    obj: S3Object,
    *,
    region: str = "us-east-1",
    reason: str | None = None,
    source_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    """The event S3 puts on the default bus for a new object (detail-type Object Created)."""
    if reason is None:
        # A multipart upload's ETag is "<md5 of part md5s>-<parts>".
        reason = "CompleteMultipartUpload" if "-" in obj.etag else "PutObject"
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": OBJECT_CREATED,
        "source": S3_SOURCE,
        "account": ACCOUNT_ID,
        "time": obj.last_modified.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:s3:::{obj.bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": obj.bucket},
            "object": {
                "key": obj.key,
                "size": obj.size,
                "etag": obj.etag,
                "sequencer": _sequencer(),
            },
            "request-id": uuid.uuid4().hex[:16].upper(),
            "requester": ACCOUNT_ID,
            "source-ip-address": source_ip,
            "reason": reason,
        },
    }


# --------------------------------------------------------------------------- rules


class Invocable(Protocol):
    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult: ...


@dataclass(frozen=True)
class S3Rule:
    """One function event of type EventBridgeRule on S3 "Object Created", resolved."""

    name: str  # e.g. UploadFunctionAudioUploaded
    function_name: str
    pattern: dict[str, Any]
    target: Invocable

    def __post_init__(self) -> None:
        validate_pattern(self.pattern)  # fail at start-up, not on the first event

    @property
    def buckets(self) -> list[str] | None:
        """The exact bucket names the pattern names; None when it names no bucket."""
        bucket = self._detail().get("bucket")
        return exact_strings(bucket.get("name")) if isinstance(bucket, Mapping) else None

    @property
    def key_prefix(self) -> str:
        obj = self._detail().get("object")
        return listing_prefix(obj.get("key")) if isinstance(obj, Mapping) else ""

    def _detail(self) -> Mapping[str, Any]:
        detail = self.pattern.get("detail")
        return detail if isinstance(detail, Mapping) else {}


def is_s3_object_created(pattern: Mapping[str, Any]) -> bool:
    """Whether S3 "Object Created" events can match this pattern."""
    head = {k: pattern[k] for k in ("source", "detail-type") if k in pattern}
    return _matches(head, {"source": S3_SOURCE, "detail-type": OBJECT_CREATED})


def eventbridge_buckets(stack: LocalStack) -> dict[str, str]:
    """{bucket name: logical id} of the template's buckets that send events to EventBridge."""
    buckets = {}
    for logical_id, resource in stack.template.get("Resources", {}).items():
        if resource.get("Type") != "AWS::S3::Bucket":
            continue
        props = resource.get("Properties", {})
        config = props.get("NotificationConfiguration", {}).get("EventBridgeConfiguration", {})
        if str(stack.resolver.resolve(config.get("EventBridgeEnabled", False))).lower() == "true":
            buckets[stack.ref(logical_id)] = logical_id
    return buckets


def template_rules(stack: LocalStack, targets: Mapping[str, Invocable]) -> list[S3Rule]:
    """Every enabled EventBridgeRule event of the template's functions that S3 can match."""
    rules = []
    for function_name in stack.functions():
        events = stack.template["Resources"][function_name]["Properties"].get("Events", {})
        for event_name, event in events.items():
            if event.get("Type") not in RULE_EVENT_TYPES:
                continue
            props = event.get("Properties", {})
            if props.get("State", "ENABLED") != "ENABLED" or props.get("Enabled") is False:
                continue
            bus = props.get("EventBusName")
            if bus not in (None, "default"):
                continue  # S3 sends to the default bus only
            pattern = stack.resolver.resolve(props.get("Pattern", {}))
            if is_s3_object_created(pattern):
                rules.append(
                    S3Rule(
                        name=f"{function_name}{event_name}",
                        function_name=function_name,
                        pattern=pattern,
                        target=targets[function_name],
                    )
                )
    return rules


# --------------------------------------------------------------------------- delivery


@dataclass
class AsyncInvoker:
    """Lambda's asynchronous invoke for one rule's target: queued, retried, never blocking."""

    rule: S3Rule
    retry_delays_s: Sequence[float] = DEFAULT_RETRY_DELAYS_S
    concurrency: int = LOCAL_ASYNC_CONCURRENCY
    log: Log | None = None
    invocations: int = 0
    succeeded: int = 0  # events delivered
    failures: int = 0  # failed invocations, retries included
    dropped: int = 0  # events given up on
    _pending: int = 0
    _queue: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for index in range(max(1, self.concurrency)):
            thread = threading.Thread(
                target=self._work, daemon=True, name=f"s3-async-{self.rule.name}-{index}"
            )
            thread.start()
            self._threads.append(thread)

    def submit(self, event: dict[str, Any]) -> None:
        if not self._stop.is_set():
            with self._lock:
                self._pending += 1
            self._queue.put(event)

    @property
    def idle(self) -> bool:
        """No event queued, being invoked or waiting for a retry."""
        with self._lock:
            return self._pending == 0

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking events; an invocation under way finishes (bounded by its Timeout)."""
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while not self._stop.is_set():
            event = self._queue.get()
            if event is None:
                return
            try:
                self._deliver(event)
            finally:
                with self._lock:
                    self._pending -= 1

    def _deliver(self, event: dict[str, Any]) -> None:
        key = event["detail"]["object"]["key"]
        attempts = 1 + len(self.retry_delays_s)
        for attempt in range(1, attempts + 1):
            error = self._invoke_once(event)
            if error is None:
                return
            with self._lock:
                self.failures += 1
            last = attempt == attempts
            if self.log:
                then = "dropping the event" if last else "retrying"
                self.log(f"[s3] {key}: attempt {attempt}/{attempts} failed ({error}); {then}")
            if last or self._stop.wait(self.retry_delays_s[attempt - 1]):
                with self._lock:
                    self.dropped += 1
                return

    def _invoke_once(self, event: dict[str, Any]) -> str | None:
        try:
            result = self.rule.target.invoke(copy.deepcopy(event))
        except Exception as error:  # a target that raises is a failed invocation, not a crash
            result = InvocationResult(
                ok=False, error_type=type(error).__name__, error_message=str(error)
            )
        with self._lock:
            self.invocations += 1
            self.succeeded += result.ok
        if result.ok:
            return None
        return f"{result.error_type}: {result.error_message}"


@dataclass
class BucketPoller:
    """Lists one bucket under a prefix and reports objects that are new or changed."""

    bucket: str
    prefix: str
    on_created: Callable[[S3Object], None]
    interval_s: float = DEFAULT_POLL_INTERVAL_S
    region: str = "us-east-1"
    endpoint_url: str | None = None
    log: Log | None = None
    page_size: int = 1000  # ListObjectsV2's MaxKeys (1,000 is S3's maximum)
    polls: int = 0
    _seen: dict[str, tuple[str, datetime]] | None = None  # None: no baseline yet
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _client: Any = None

    def start(self) -> None:
        """Take the baseline listing now (what exists is not an event), then poll."""
        self._client = boto3.client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}),
        )
        try:
            self.poll_once()  # the baseline
        except Exception as error:
            # The first listing that works becomes the baseline instead.
            self._report(f"[s3] listing s3://{self.bucket}/{self.prefix} failed: {error}")
        self._thread = threading.Thread(
            target=self._loop, daemon=True, name=f"s3-poll-{self.bucket}"
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def poll_once(self) -> list[S3Object]:
        """One listing: the objects created or overwritten since the last one."""
        objects = self._list()
        seen = self._seen
        created = [] if seen is None else [o for o in objects if seen.get(o.key) != o.version]
        self._seen = {o.key: o.version for o in objects}  # deleted keys are forgotten
        self.polls += 1
        return sorted(created, key=lambda o: (o.last_modified, o.key))

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                created = self.poll_once()
            except Exception as error:
                if not failing:  # once per outage, not five times a second
                    self._report(f"[s3] listing s3://{self.bucket}/{self.prefix} failed: {error}")
                failing = True
                continue
            failing = False
            for obj in created:
                if self._stop.is_set():
                    return
                try:
                    self.on_created(obj)
                except Exception as error:  # one bad object must not end the poller
                    self._report(f"[s3] handing on s3://{self.bucket}/{obj.key} failed: {error}")

    def _report(self, message: str) -> None:
        if self.log:
            self.log(message)

    def _list(self) -> list[S3Object]:
        paginator = self._client.get_paginator("list_objects_v2")
        objects = []
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": self.page_size}
        )
        for page in pages:
            for item in page.get("Contents", []):
                objects.append(
                    S3Object(
                        bucket=self.bucket,
                        key=item["Key"],
                        size=int(item["Size"]),
                        etag=str(item["ETag"]).strip('"'),
                        last_modified=item["LastModified"],
                    )
                )
        return objects


@dataclass
class S3EventBridge:
    """Pollers for the buckets the rules name, fanning each event out to matching rules."""

    rules: list[S3Rule]
    region: str = "us-east-1"
    interval_s: float = DEFAULT_POLL_INTERVAL_S
    retry_delays_s: Sequence[float] = DEFAULT_RETRY_DELAYS_S
    endpoint_url: str | None = None
    # Buckets that send events to EventBridge; None = every bucket the rules name.
    enabled_buckets: Iterable[str] | None = None
    log: Log | None = None
    # (function name, line): where delivery failures go; default: `log`, prefixed.
    function_log: Callable[[str, str], None] | None = None
    events: int = 0
    pollers: list[BucketPoller] = field(default_factory=list)
    invokers: dict[str, AsyncInvoker] = field(default_factory=dict)

    def start(self) -> None:
        enabled = None if self.enabled_buckets is None else set(self.enabled_buckets)
        by_bucket: dict[str, list[S3Rule]] = {}
        for rule in self.rules:
            buckets = rule.buckets if rule.buckets is not None else sorted(enabled or ())
            for bucket in buckets:
                if enabled is not None and bucket not in enabled:
                    self._log(
                        f"[s3] rule {rule.name}: bucket {bucket} does not send events to "
                        "EventBridge (EventBridgeConfiguration.EventBridgeEnabled), so the "
                        "rule never fires, as on AWS"
                    )
                    continue
                by_bucket.setdefault(bucket, []).append(rule)
        for rule in self.rules:
            invoker = AsyncInvoker(
                rule=rule, retry_delays_s=self.retry_delays_s, log=self._function_log(rule)
            )
            invoker.start()
            self.invokers[rule.name] = invoker
        for bucket, rules in sorted(by_bucket.items()):
            prefix = common_prefix(r.key_prefix for r in rules)
            poller = BucketPoller(
                bucket=bucket,
                prefix=prefix,
                on_created=self._dispatch,
                interval_s=self.interval_s,
                region=self.region,
                endpoint_url=self.endpoint_url,
                log=self.log,
            )
            poller.start()
            self.pollers.append(poller)
            names = ", ".join(r.function_name for r in rules)
            self._log(f"[s3] s3://{bucket}/{prefix}* Object Created -> {names}")

    def stop(self) -> None:
        for poller in self.pollers:
            poller.stop()
        for invoker in self.invokers.values():
            invoker.stop()

    def _dispatch(self, obj: S3Object) -> None:
        event = object_created_event(obj, region=self.region)
        self.events += 1
        for rule in self.rules:
            if _matches(rule.pattern, event):  # validated when the rule was made
                self.invokers[rule.name].submit(event)

    def _log(self, message: str) -> None:
        if self.log:
            self.log(message)

    def _function_log(self, rule: S3Rule) -> Log | None:
        function_log, log = self.function_log, self.log

        def emit(message: str) -> None:
            if function_log is not None:
                function_log(rule.function_name, message)
            elif log is not None:
                log(f"{rule.function_name}: {message}")

        return emit if function_log is not None or log is not None else None
