"""The local Lambda runtime and SQS event source mapping, with real worker processes."""

from __future__ import annotations

import json
import os
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest

from gpuqueue_local.event_source_mapping import IDLE_POLLERS, LONG_POLL_SECONDS, SqsEventSource
from gpuqueue_local.lambda_runtime import FunctionRuntime, FunctionSpec, InvocationResult
from gpuqueue_local.provision import LocalStack, provision
from gpuqueue_local.stack import _endpoint_parameters, _wait_for_endpoints
from gpuqueue_local.template import load_template
from gpuqueue_testing import wait_for

LOCAL = Path(__file__).resolve().parents[2] / "local"

# One handler that does what the event asks, so a test can fail a worker and then show the
# same function recovering.
PROBE = """
import json
import os
import pathlib
import sys
import time


def handler(event, context):
    if "started" in event:
        pathlib.Path(event["started"]).touch()
    action = event.get("action", "report")
    if action == "raise":
        raise ValueError("boom: " + event.get("why", ""))
    if action == "exit":
        os._exit(3)
    if action == "allocate":
        held = bytearray(event["mb"] << 20)  # touched: resident, not only reserved
        del held
    if action == "print":
        print("hello from the handler")
        sys.stdout.flush()
        os.write(1, b"raw bytes on fd 1\\n")
    began = time.time()
    time.sleep(event.get("sleep", 0))
    if "spans" in event:
        with open(event["spans"], "a") as spans:
            spans.write(json.dumps([began, time.time()]) + "\\n")
    return {
        "remaining_ms": context.get_remaining_time_in_millis(),
        "env": os.environ.get("MY_VAR"),
        "function_name": context.function_name,
        "pid": os.getpid(),
    }
"""

# An SQS consumer reporting partial batch failures; it writes each delivered body down.
BATCH = """
import os


def _record(event):
    with open(os.environ["DELIVERIES"], "a") as log:
        for record in event["Records"]:
            log.write(record["body"] + "\\n")


def partial(event, context):
    _record(event)
    return {
        "batchItemFailures": [
            {"itemIdentifier": r["messageId"]} for r in event["Records"] if "bad" in r["body"]
        ]
    }


def raises(event, context):
    _record(event)
    raise RuntimeError("the whole batch fails")
"""


@dataclass
class LogSink:
    """Collects what the runtime logs, as (function name, line)."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, function_name: str, line: str) -> None:
        with self._lock:
            self.lines.append((function_name, line))

    def has(self, function_name: str, line: str) -> bool:
        with self._lock:
            return (function_name, line) in self.lines


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "probe.py").write_text(textwrap.dedent(PROBE))
    (code / "batch.py").write_text(textwrap.dedent(BATCH))
    return code


@pytest.fixture
def log_sink() -> LogSink:
    return LogSink()


@pytest.fixture
def make_function(code_dir: Path, log_sink: LogSink) -> Iterator[Callable[..., FunctionRuntime]]:
    runtimes: list[FunctionRuntime] = []

    def make(
        handler: str = "probe.handler",
        *,
        logical_id: str = "Probe",
        timeout_seconds: float = 10.0,
        reserved_concurrency: int | None = None,
        env: dict[str, str] | None = None,
        memory_mb: int = 512,
    ) -> FunctionRuntime:
        spec = FunctionSpec(
            logical_id=logical_id,
            handler=handler,
            code_dir=code_dir,
            layer_dirs=(),
            env={"MY_VAR": "x", **(env or {})},
            timeout_seconds=timeout_seconds,
            memory_mb=memory_mb,
            reserved_concurrency=reserved_concurrency,
        )
        runtime = FunctionRuntime(
            spec, base_env={"PATH": os.environ["PATH"], "PYTHONPATH": str(LOCAL)}, log=log_sink
        )
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        runtime.stop()


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans running at one moment (an end and a start at once do not overlap)."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


# --- FunctionRuntime --------------------------------------------------------------------


def test_invocation_returns_the_handlers_result_with_the_functions_environment(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    result = make_function(logical_id="Probe").invoke({})

    assert result.ok, result
    assert result.payload["env"] == "x"
    assert result.payload["function_name"] == "Probe"


def test_remaining_time_starts_near_the_functions_timeout(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    result = make_function(timeout_seconds=3.0).invoke({})

    assert result.ok, result
    assert 2500 < result.payload["remaining_ms"] <= 3000


def test_remaining_time_follows_a_shorter_caller_timeout(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    result = make_function(timeout_seconds=30.0).invoke({}, timeout_seconds=2.0)

    assert result.ok, result
    assert 1500 < result.payload["remaining_ms"] <= 2000


def test_invocation_past_the_timeout_is_cut_off(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    function = make_function(timeout_seconds=1.0)

    started = time.monotonic()
    result = function.invoke({"sleep": 30})
    elapsed = time.monotonic() - started

    assert result.timed_out
    assert not result.ok
    assert result.error_type == "Sandbox.Timedout"
    assert elapsed < 6.0  # the handler would sleep 30 s


def test_invocation_after_a_timeout_runs_on_a_fresh_worker(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    function = make_function(timeout_seconds=1.0)
    first = function.invoke({})
    assert first.ok, first

    assert function.invoke({"sleep": 30}).timed_out
    after = function.invoke({})

    assert after.ok, after
    assert after.payload["pid"] != first.payload["pid"]


def test_warm_worker_serves_the_next_invocation(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    function = make_function()

    pids = {function.invoke({}).payload["pid"] for _ in range(3)}

    assert len(pids) == 1


def test_raised_exception_fails_the_invocation_with_its_type(
    make_function: Callable[..., FunctionRuntime], log_sink: LogSink
) -> None:
    function = make_function()

    result = function.invoke({"action": "raise", "why": "bad input"})

    assert not result.ok
    assert not result.timed_out
    assert result.error_type == "ValueError"
    assert result.error_message == "boom: bad input"
    wait_for(
        lambda: log_sink.has("Probe", "ValueError: boom: bad input"),
        timeout=5.0,
        what="the traceback in the function's log",
    )


def test_process_exit_mid_invocation_fails_it_and_the_function_recovers(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    function = make_function()

    crashed = function.invoke({"action": "exit"})
    after = function.invoke({})

    assert not crashed.ok
    assert not crashed.timed_out
    assert crashed.error_type == "Runtime.ExitError"
    assert after.ok, after


def test_handler_stdout_goes_to_the_log_and_leaves_the_result_intact(
    make_function: Callable[..., FunctionRuntime], log_sink: LogSink
) -> None:
    result = make_function(logical_id="Chatty").invoke({"action": "print"})

    assert result.ok, result
    assert result.payload["env"] == "x"
    wait_for(
        lambda: (
            log_sink.has("Chatty", "hello from the handler")
            and log_sink.has("Chatty", "raw bytes on fd 1")
        ),
        timeout=5.0,
        what="the handler's stdout in the log",
    )


def test_reserved_concurrency_caps_invocations_running_at_once(
    make_function: Callable[..., FunctionRuntime], tmp_path: Path
) -> None:
    function = make_function(reserved_concurrency=2)
    spans = tmp_path / "spans.jsonl"

    with ThreadPoolExecutor(max_workers=5) as pool:
        futures = [
            pool.submit(function.invoke, {"sleep": 0.5, "spans": str(spans)}) for _ in range(5)
        ]
        results = [f.result(timeout=30) for f in futures]

    assert all(r.ok for r in results), results
    recorded = [tuple(json.loads(line)) for line in spans.read_text().splitlines()]
    assert len(recorded) == 5
    assert max_overlap(recorded) <= 2


def test_crash_workers_fails_the_invocation_in_flight(
    make_function: Callable[..., FunctionRuntime], tmp_path: Path
) -> None:
    function = make_function()
    marker = tmp_path / "started"
    results: list[InvocationResult] = []
    caller = threading.Thread(
        target=lambda: results.append(function.invoke({"sleep": 30, "started": str(marker)}))
    )
    caller.start()
    wait_for(marker.exists, timeout=10.0, what="the handler to start")

    assert function.crash_workers() >= 1

    caller.join(timeout=10.0)
    assert not caller.is_alive()
    [result] = results
    assert not result.ok
    assert not result.timed_out
    assert result.error_type == "Runtime.ExitError"


def test_function_recovers_after_crash_workers(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    function = make_function()
    assert function.invoke({}).ok

    assert function.crash_workers() == 1

    assert function.invoke({}).ok
    # The dead worker was replaced, not kept: one worker is alive and accounted for.
    assert function.crash_workers() == 1


def test_invocations_and_errors_are_counted(make_function: Callable[..., FunctionRuntime]) -> None:
    function = make_function()

    function.invoke({})
    function.invoke({"action": "raise"})

    assert (function.invocations, function.errors) == (2, 1)


def test_each_invocation_reports_the_workers_peak_memory_as_lambda_does(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    function = make_function()

    small = function.invoke({})
    large = function.invoke({"action": "allocate", "mb": 64})

    assert small.max_memory_mb is not None
    assert large.max_memory_mb is not None
    assert large.max_memory_mb >= small.max_memory_mb + 60  # the 64 MB it held
    assert function.peak_memory_mb == large.max_memory_mb


def test_an_invocation_past_the_functions_memory_size_is_killed_as_lambda_does(
    make_function: Callable[..., FunctionRuntime],
) -> None:
    small = make_function().invoke({})
    assert small.max_memory_mb is not None
    # Room for what the runtime takes, not for 64 MB more.
    function = make_function(memory_mb=small.max_memory_mb + 32)

    assert function.invoke({}).ok
    killed = function.invoke({"action": "allocate", "mb": 64})

    assert not killed.ok
    assert killed.error_type == "Runtime.OutOfMemory"
    assert "Max Memory Used" in (killed.error_message or "")
    # The next invocation gets a fresh sandbox, as on Lambda.
    assert function.invoke({}).ok


# --- SqsEventSource against moto --------------------------------------------------------


@dataclass
class Queues:
    sqs: Any
    url: str
    arn: str
    dlq_url: str

    def counts(self, url: str | None = None) -> tuple[int, int, int]:
        """(visible, in flight, delayed) messages."""
        attrs = self.sqs.get_queue_attributes(QueueUrl=url or self.url, AttributeNames=["All"])[
            "Attributes"
        ]
        return (
            int(attrs["ApproximateNumberOfMessages"]),
            int(attrs["ApproximateNumberOfMessagesNotVisible"]),
            int(attrs["ApproximateNumberOfMessagesDelayed"]),
        )

    def empty(self) -> bool:
        return self.counts() == (0, 0, 0)

    def dead_letters(self) -> int:
        return self.counts(self.dlq_url)[0]

    def send(self, *bodies: str) -> None:
        for body in bodies:
            self.sqs.send_message(QueueUrl=self.url, MessageBody=body)


@pytest.fixture
def queues(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Queues:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    sqs = boto3.client("sqs", region_name="us-east-1")
    name = f"esm-{uuid.uuid4().hex[:8]}"
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": "1",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
        },
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return Queues(sqs=sqs, url=url, arn=arn, dlq_url=dlq_url)


@pytest.fixture
def deliveries(tmp_path: Path) -> Path:
    return tmp_path / "deliveries.txt"


def delivered(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def start_source(
    make_function: Callable[..., FunctionRuntime], queues: Queues, deliveries: Path
) -> Iterator[Callable[[str], SqsEventSource]]:
    sources: list[SqsEventSource] = []

    def start(handler: str) -> SqsEventSource:
        function = make_function(
            handler, logical_id="Consumer", env={"DELIVERIES": str(deliveries)}
        )
        source = SqsEventSource(
            function=function,
            queue_url=queues.url,
            queue_arn=queues.arn,
            batch_size=5,
            concurrency=1,
        )
        sources.append(source)
        source.start()
        return source

    yield start
    for source in sources:
        source.stop()


def test_event_source_deletes_messages_the_function_handled(
    start_source: Callable[[str], SqsEventSource], queues: Queues, deliveries: Path
) -> None:
    queues.send("good-1", "good-2")

    start_source("batch.partial")

    wait_for(queues.empty, timeout=10.0, what="the queue to empty")
    assert sorted(delivered(deliveries)) == ["good-1", "good-2"]
    assert queues.dead_letters() == 0


def test_an_idle_queue_is_polled_by_five_pollers_whatever_the_concurrency(
    make_function: Callable[..., FunctionRuntime], queues: Queues, deliveries: Path
) -> None:
    pollers: set[str] = set()
    receives: list[str] = []

    def count(**_: Any) -> None:
        receives.append(threading.current_thread().name)
        pollers.add(threading.current_thread().name)

    # Clients the pollers make from now on carry the hook (the default session's events).
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-call.sqs.ReceiveMessage", count)  # type: ignore[union-attr]
    function = make_function(
        "batch.partial", logical_id="Idle", env={"DELIVERIES": str(deliveries)}
    )
    source = SqsEventSource(
        function=function, queue_url=queues.url, queue_arn=queues.arn, batch_size=5, concurrency=20
    )
    source.start()
    try:
        # Three rounds of long polls by the first pollers: time enough for any other to start.
        wait_for(lambda: len(receives) >= 3 * IDLE_POLLERS, timeout=30.0, what="idle polls")
        idle_pollers = set(pollers)
        queues.send(*[f"m{i}" for i in range(12)])
        wait_for(queues.empty, timeout=20.0, what="the queue to empty")
    finally:
        source.stop()
        boto3.setup_default_session()

    assert len(idle_pollers) == IDLE_POLLERS, sorted(idle_pollers)
    # Every message handled (at least once: this queue's visibility timeout is 1 s, shorter
    # than a cold start, so a message may come twice, as SQS would deliver it).
    assert set(delivered(deliveries)) == {f"m{i}" for i in range(12)}


def test_event_source_redelivers_a_reported_failure_until_it_is_dead_lettered(
    start_source: Callable[[str], SqsEventSource], queues: Queues, deliveries: Path
) -> None:
    queues.send("good-1", "bad-1", "good-2")

    start_source("batch.partial")

    wait_for(lambda: queues.dead_letters() == 1, timeout=15.0, what="the bad message in the DLQ")
    wait_for(queues.empty, timeout=5.0, what="the queue to empty")
    seen = delivered(deliveries)
    assert seen.count("bad-1") == 2  # maxReceiveCount
    assert seen.count("good-1") == 1
    assert seen.count("good-2") == 1
    [dead] = queues.sqs.receive_message(QueueUrl=queues.dlq_url, WaitTimeSeconds=0)["Messages"]
    assert dead["Body"] == "bad-1"


def test_event_source_leaves_the_whole_batch_when_the_function_fails(
    start_source: Callable[[str], SqsEventSource], queues: Queues, deliveries: Path
) -> None:
    queues.send("m-1", "m-2")

    start_source("batch.raises")

    wait_for(lambda: queues.dead_letters() == 2, timeout=15.0, what="both messages in the DLQ")
    seen = delivered(deliveries)
    assert seen.count("m-1") == 2
    assert seen.count("m-2") == 2


def test_event_source_stops_promptly(
    start_source: Callable[[str], SqsEventSource], queues: Queues
) -> None:
    source = start_source("batch.partial")
    wait_for(lambda: source._threads, timeout=5.0, what="the poller to start")

    started = time.monotonic()
    source.stop()
    elapsed = time.monotonic() - started

    assert elapsed < LONG_POLL_SECONDS + 2.0
    assert not any(thread.is_alive() for thread in source._threads)


# --- the stack's wiring: speech stand-ins and readiness ---------------------------------


def test_speech_urls_become_a_parameter_only_when_the_template_declares_it() -> None:
    images = [SimpleNamespace(url="http://127.0.0.1:8001"), SimpleNamespace(url="http://h:2")]
    speech = [SimpleNamespace(url="http://127.0.0.1:8101")]
    with_speech = {"Parameters": {"ImageEndpointUrls": {}, "SpeechEndpointUrls": {}}}
    without_speech = {"Parameters": {"ImageEndpointUrls": {}}}

    assert _endpoint_parameters(with_speech, images, speech) == {
        "ImageEndpointUrls": "http://127.0.0.1:8001,http://h:2",
        "SpeechEndpointUrls": "http://127.0.0.1:8101",
    }
    assert _endpoint_parameters(without_speech, images, speech) == {
        "ImageEndpointUrls": "http://127.0.0.1:8001,http://h:2"
    }
    assert "SpeechEndpointUrls" not in _endpoint_parameters(with_speech, images, [])


@pytest.fixture
def endpoints_stack(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> LocalStack:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    table = load_template()["Resources"]["EndpointsTable"]
    return provision(
        stack_name=f"ready-{uuid.uuid4().hex[:6]}",
        template={"Resources": {"EndpointsTable": table}},
    )


def test_readiness_waits_for_healthy_endpoints_of_each_kind(endpoints_stack: LocalStack) -> None:
    table = boto3.resource("dynamodb").Table(endpoints_stack.ref("EndpointsTable"))

    def row(endpoint_id: str, kind: str, healthy: bool, row_type: str = "endpoint") -> None:
        table.put_item(
            Item={
                "endpoint_id": endpoint_id,
                "kind": kind,
                "healthy": healthy,
                "row_type": row_type,
            }
        )

    row("image-1", "image", True)
    row("image-2", "image", True)
    row("speech-1", "speech", False)
    row("speech-1#slot#0", "speech", True, row_type="slot")  # a lease is not an endpoint

    assert _wait_for_endpoints(endpoints_stack, {"image": 2, "speech": 0}, timeout=5.0)
    assert not _wait_for_endpoints(endpoints_stack, {"image": 2, "speech": 1}, timeout=0.3)
    assert not _wait_for_endpoints(endpoints_stack, {"image": 3, "speech": 0}, timeout=0.3)

    row("speech-1", "speech", True)

    assert _wait_for_endpoints(endpoints_stack, {"image": 2, "speech": 1}, timeout=5.0)
