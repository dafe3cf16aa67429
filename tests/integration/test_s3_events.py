"""S3 -> EventBridge -> Lambda, emulated against a moto server: which uploads become events.

The bridge polls real (moto) buckets; targets are fakes recording what they get, except the
last tests, which run a real function worker through the same path as `make up`.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpuqueue_local.lambda_runtime import FunctionRuntime, FunctionSpec, InvocationResult
from gpuqueue_local.provision import provision
from gpuqueue_local.s3_events import S3EventBridge, S3Rule
from gpuqueue_local.stack import LogPrinter, s3_event_bridge
from gpuqueue_testing import wait_for

LOCAL = Path(__file__).resolve().parents[2] / "local"
POLL_S = 0.05
RETRY_DELAYS_S = (0.05, 0.05)


@dataclass
class FakeFunction:
    """FunctionRuntime's invoke: records events; fails the first `failures` invocations."""

    failures: int = 0
    raises: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        with self._lock:
            self.calls += 1
            failing = self.calls <= self.failures
            if not failing:
                self.events.append(event)
        if failing and self.raises:
            raise ConnectionError("the worker went away")
        if failing:
            return InvocationResult(ok=False, error_type="RuntimeError", error_message="boom")
        return InvocationResult(ok=True, payload=None)

    def keys(self) -> list[str]:
        with self._lock:
            return [e["detail"]["object"]["key"] for e in self.events]


def upload_pattern(bucket: str, prefix: str = "audio/") -> dict[str, Any]:
    return {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {"bucket": {"name": [bucket]}, "object": {"key": [{"prefix": prefix}]}},
    }


@dataclass
class Buckets:
    s3: Any
    uploads: str
    other: str

    def put(self, key: str, body: bytes = b"RIFF....WAVEfmt ", bucket: str | None = None) -> None:
        self.s3.put_object(Bucket=bucket or self.uploads, Key=key, Body=body)


@pytest.fixture
def buckets(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Buckets:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    s3 = boto3.client("s3", region_name="us-east-1")
    names = [f"s3ev-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for name in names:
        s3.create_bucket(Bucket=name)
    return Buckets(s3=s3, uploads=names[0], other=names[1])


@pytest.fixture
def start_bridge(moto_url: str) -> Iterator[Callable[..., S3EventBridge]]:
    bridges: list[S3EventBridge] = []

    def start(*rules: tuple[dict[str, Any], FakeFunction], **kwargs: Any) -> S3EventBridge:
        bridge = S3EventBridge(
            rules=[
                S3Rule(name=f"Rule{i}", function_name=f"Function{i}", pattern=p, target=t)
                for i, (p, t) in enumerate(rules)
            ],
            interval_s=POLL_S,
            retry_delays_s=RETRY_DELAYS_S,
            endpoint_url=moto_url,
            **kwargs,
        )
        bridges.append(bridge)
        bridge.start()
        return bridge

    yield start
    for bridge in bridges:
        bridge.stop()


def settle(bridge: S3EventBridge, polls: int = 3) -> None:
    """Let every poller list the bucket a few more times and the invokers go idle."""
    targets = {poller.bucket: poller.polls + polls for poller in bridge.pollers}
    wait_for(
        lambda: (
            all(p.polls >= targets[p.bucket] for p in bridge.pollers)
            and all(invoker.idle for invoker in bridge.invokers.values())
        ),
        timeout=10.0,
        what="more polls",
    )


def test_an_upload_under_the_prefix_is_one_event_describing_it(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function = FakeFunction()
    bridge = start_bridge((upload_pattern(buckets.uploads), function))

    buckets.put("audio/one.wav", b"x" * 1234)

    wait_for(lambda: function.events, timeout=10.0, what="the event")
    settle(bridge)
    [event] = function.events
    assert event["source"] == "aws.s3"
    assert event["detail-type"] == "Object Created"
    assert event["resources"] == [f"arn:aws:s3:::{buckets.uploads}"]
    assert event["detail"]["bucket"] == {"name": buckets.uploads}
    obj = event["detail"]["object"]
    head = buckets.s3.head_object(Bucket=buckets.uploads, Key="audio/one.wav")
    assert (obj["key"], obj["size"]) == ("audio/one.wav", 1234)
    assert obj["etag"] == head["ETag"].strip('"')
    assert event["detail"]["reason"] == "PutObject"
    json.dumps(event)  # what a worker is sent must be JSON


def test_objects_outside_the_prefix_or_in_another_bucket_are_no_events(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function, other_function = FakeFunction(), FakeFunction()
    bridge = start_bridge(
        (upload_pattern(buckets.uploads), function),
        (upload_pattern(buckets.other, prefix="in/"), other_function),
    )

    buckets.put("results/a.png")
    buckets.put("audiox/b.wav")
    buckets.put("Audio/c.wav")
    buckets.put("audio/d.wav", bucket=buckets.other)
    buckets.put("in/e.wav")  # the other rule's prefix, in the wrong bucket
    buckets.put("audio/marker.wav")  # after the others: once it is seen, so were they

    wait_for(lambda: function.events, timeout=10.0, what="the marker's event")
    settle(bridge)
    assert function.keys() == ["audio/marker.wav"]
    assert other_function.events == []


def test_objects_there_before_the_bridge_started_are_no_events(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    buckets.put("audio/old-1.wav")
    buckets.put("audio/old-2.wav")
    function = FakeFunction()
    bridge = start_bridge((upload_pattern(buckets.uploads), function))

    buckets.put("audio/new.wav")

    wait_for(lambda: function.events, timeout=10.0, what="the new object's event")
    settle(bridge)
    assert function.keys() == ["audio/new.wav"]


def test_an_overwrite_with_new_content_is_a_new_event(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function = FakeFunction()
    bridge = start_bridge((upload_pattern(buckets.uploads), function))
    buckets.put("audio/a.wav", b"first")
    wait_for(lambda: len(function.events) == 1, timeout=10.0, what="the first event")

    buckets.put("audio/a.wav", b"second take")

    wait_for(lambda: len(function.events) == 2, timeout=10.0, what="the overwrite's event")
    settle(bridge)
    first, second = (e["detail"]["object"] for e in function.events)
    assert len(function.events) == 2
    assert first["etag"] != second["etag"]
    assert (first["size"], second["size"]) == (5, 11)
    assert first["sequencer"] < second["sequencer"]


def test_a_deleted_and_recreated_object_is_a_new_event(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function = FakeFunction()
    bridge = start_bridge((upload_pattern(buckets.uploads), function))
    buckets.put("audio/a.wav", b"same")
    wait_for(lambda: len(function.events) == 1, timeout=10.0, what="the first event")
    buckets.s3.delete_object(Bucket=buckets.uploads, Key="audio/a.wav")
    settle(bridge, polls=2)  # the poller sees it gone

    buckets.put("audio/a.wav", b"same")

    wait_for(lambda: len(function.events) == 2, timeout=10.0, what="the re-upload's event")


def test_every_page_of_the_listing_is_read(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function = FakeFunction()
    bridge = start_bridge((upload_pattern(buckets.uploads), function))
    for poller in bridge.pollers:
        poller.page_size = 2

    for index in range(5):
        buckets.put(f"audio/{index}.wav")

    wait_for(lambda: len(function.events) == 5, timeout=10.0, what="five events")
    settle(bridge)
    assert sorted(function.keys()) == [f"audio/{i}.wav" for i in range(5)]


def test_a_multipart_upload_is_an_event_with_its_reason(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function = FakeFunction()
    start_bridge((upload_pattern(buckets.uploads), function))

    upload = buckets.s3.create_multipart_upload(Bucket=buckets.uploads, Key="audio/big.wav")
    part = buckets.s3.upload_part(
        Bucket=buckets.uploads,
        Key="audio/big.wav",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"y" * 100,
    )
    buckets.s3.complete_multipart_upload(
        Bucket=buckets.uploads,
        Key="audio/big.wav",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )

    [event] = wait_for(lambda: function.events, timeout=10.0, what="the event")
    assert event["detail"]["reason"] == "CompleteMultipartUpload"
    assert event["detail"]["object"]["size"] == 100


def test_a_failed_invocation_is_retried_twice_and_then_dropped(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function = FakeFunction(failures=10)
    logged: list[str] = []
    bridge = start_bridge((upload_pattern(buckets.uploads), function), log=logged.append)
    [invoker] = bridge.invokers.values()

    buckets.put("audio/a.wav")

    wait_for(lambda: invoker.dropped == 1, timeout=10.0, what="the event to be dropped")
    settle(bridge)
    assert function.calls == 3  # the invocation and two retries
    assert (invoker.invocations, invoker.failures, invoker.succeeded) == (3, 3, 0)
    assert any("attempt 3/3 failed" in line and "dropping" in line for line in logged)


def test_an_invocation_that_fails_once_succeeds_on_the_retry(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    function = FakeFunction(failures=1, raises=True)
    bridge = start_bridge((upload_pattern(buckets.uploads), function))
    [invoker] = bridge.invokers.values()

    buckets.put("audio/a.wav")

    wait_for(lambda: function.events, timeout=10.0, what="the retried event")
    settle(bridge)
    assert function.calls == 2
    assert (invoker.succeeded, invoker.dropped) == (1, 0)
    assert function.keys() == ["audio/a.wav"]


def test_a_slow_function_does_not_hold_up_polling(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    release = threading.Event()
    seen: list[str] = []

    class Slow(FakeFunction):
        def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
            seen.append(event["detail"]["object"]["key"])
            release.wait(10.0)
            return InvocationResult(ok=True)

    bridge = start_bridge((upload_pattern(buckets.uploads), Slow()))
    try:
        buckets.put("audio/1.wav")
        wait_for(lambda: seen, timeout=10.0, what="the first invocation")
        buckets.put("audio/2.wav")

        # The first invocation is still running, yet the second upload is picked up.
        wait_for(lambda: len(seen) == 2, timeout=10.0, what="the second invocation")
    finally:
        release.set()
    settle(bridge)


def test_the_bridge_stops_promptly(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    bridge = start_bridge((upload_pattern(buckets.uploads), FakeFunction()))

    started = time.monotonic()
    bridge.stop()
    elapsed = time.monotonic() - started

    assert elapsed < 2.0
    threads = [p._thread for p in bridge.pollers] + [
        t for i in bridge.invokers.values() for t in i._threads
    ]
    assert threads
    assert not any(t is not None and t.is_alive() for t in threads)


# --- from the template to a real function worker ---------------------------------------------

UPLOAD_HANDLER = """
import json
import os


def lambda_handler(event, context):
    with open(os.environ["EVENTS_FILE"], "a") as events:
        events.write(json.dumps(event) + "\\n")
    return {"ok": True}
"""


def rule_template(*, eventbridge: bool) -> dict[str, Any]:
    bucket: dict[str, Any] = {"Type": "AWS::S3::Bucket", "Properties": {}}
    if eventbridge:
        bucket["Properties"]["NotificationConfiguration"] = {
            "EventBridgeConfiguration": {"EventBridgeEnabled": True}
        }
    return {
        "Resources": {
            "ImagesBucket": bucket,
            "UploadFunction": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "Handler": "upload_handler.lambda_handler",
                    "CodeUri": "functions/upload/",
                    "Runtime": "python3.12",
                    "Events": {
                        "AudioUploaded": {
                            "Type": "EventBridgeRule",
                            "Properties": {
                                "Pattern": {
                                    "source": ["aws.s3"],
                                    "detail-type": ["Object Created"],
                                    "detail": {
                                        "bucket": {"name": [{"Ref": "ImagesBucket"}]},
                                        "object": {"key": [{"prefix": "audio/"}]},
                                    },
                                }
                            },
                        }
                    },
                },
            },
        }
    }


@pytest.fixture
def upload_function(tmp_path: Path) -> Iterator[tuple[FunctionRuntime, Path]]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "upload_handler.py").write_text(textwrap.dedent(UPLOAD_HANDLER))
    events_file = tmp_path / "events.jsonl"
    spec = FunctionSpec(
        logical_id="UploadFunction",
        handler="upload_handler.lambda_handler",
        code_dir=code,
        layer_dirs=(),
        env={"EVENTS_FILE": str(events_file)},
        timeout_seconds=10.0,
        memory_mb=128,
        reserved_concurrency=None,
    )
    runtime = FunctionRuntime(
        spec,
        base_env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(LOCAL)},
        log=lambda name, line: None,
    )
    yield runtime, events_file
    runtime.stop()


def test_the_templates_rule_invokes_the_function_worker_for_an_upload(
    moto_url: str,
    monkeypatch: pytest.MonkeyPatch,
    upload_function: tuple[FunctionRuntime, Path],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    stack = provision(
        stack_name=f"s3ev-{uuid.uuid4().hex[:6]}", template=rule_template(eventbridge=True)
    )
    runtime, events_file = upload_function
    bridge = s3_event_bridge(
        stack, {"UploadFunction": runtime}, LogPrinter(quiet=True), interval_s=POLL_S
    )
    assert bridge is not None
    bridge.start()
    try:
        bucket = stack.ref("ImagesBucket")
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.put_object(Bucket=bucket, Key="results/x.png", Body=b"png")
        s3.put_object(Bucket=bucket, Key="audio/550e8400", Body=b"RIFF")

        wait_for(events_file.exists, timeout=20.0, what="the function to run")
    finally:
        bridge.stop()
    [line] = events_file.read_text().splitlines()
    event = json.loads(line)
    assert event["detail"]["bucket"]["name"] == bucket
    assert event["detail"]["object"]["key"] == "audio/550e8400"
    assert runtime.invocations == 1


def test_a_bucket_without_eventbridge_enabled_sends_nothing(
    moto_url: str,
    monkeypatch: pytest.MonkeyPatch,
    upload_function: tuple[FunctionRuntime, Path],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    stack = provision(
        stack_name=f"s3ev-{uuid.uuid4().hex[:6]}", template=rule_template(eventbridge=False)
    )
    runtime, _ = upload_function
    logged: list[str] = []
    printer = LogPrinter(quiet=True)
    printer.system = logged.append  # type: ignore[method-assign]
    bridge = s3_event_bridge(stack, {"UploadFunction": runtime}, printer, interval_s=POLL_S)
    assert bridge is not None
    bridge.start()
    bridge.stop()

    assert bridge.pollers == []
    assert any("EventBridgeEnabled" in line for line in logged)


def test_a_template_without_s3_rules_gets_no_bridge(
    moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    template = rule_template(eventbridge=True)
    del template["Resources"]["UploadFunction"]["Properties"]["Events"]
    stack = provision(stack_name=f"s3ev-{uuid.uuid4().hex[:6]}", template=template)

    assert s3_event_bridge(stack, {}, LogPrinter(quiet=True)) is None


def test_a_bucket_missing_at_start_is_watched_from_its_first_listing(
    moto_url: str, buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    late = f"s3ev-late-{uuid.uuid4().hex[:8]}"
    function = FakeFunction()
    logged: list[str] = []
    bridge = start_bridge((upload_pattern(late), function), log=logged.append)
    [poller] = bridge.pollers
    assert poller.polls == 0
    assert any("failed" in line for line in logged)

    buckets.s3.create_bucket(Bucket=late)
    wait_for(lambda: poller.polls >= 1, timeout=10.0, what="the first listing that works")
    buckets.put("audio/a.wav", bucket=late)

    wait_for(lambda: function.keys() == ["audio/a.wav"], timeout=10.0, what="the event")


def test_delivery_failures_are_logged_under_the_functions_name(
    buckets: Buckets, start_bridge: Callable[..., S3EventBridge]
) -> None:
    lines: list[tuple[str, str]] = []
    bridge = start_bridge(
        (upload_pattern(buckets.uploads), FakeFunction(failures=1)),
        function_log=lambda name, line: lines.append((name, line)),
    )
    [invoker] = bridge.invokers.values()

    buckets.put("audio/a.wav")

    wait_for(lambda: invoker.succeeded == 1, timeout=10.0, what="the retry to succeed")
    [(name, line)] = lines
    assert name == "Function0"
    assert line.startswith("[s3] audio/a.wav: attempt 1/3 failed (RuntimeError: boom); retrying")
