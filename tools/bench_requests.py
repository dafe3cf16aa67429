"""AWS requests per task and handler latency, in-process on moto (part of `make bench`).

Runs the real handlers in this process against a moto server provisioned from
template.yaml, with one zero-latency image stand-in, and counts every AWS request our code
makes with a botocore event hook (`before-call` / `after-call` on the default session),
split by phase: submit, dispatch, the tasks-stream consumer, one status poll, and the
webhook delivery. The ESM's own SQS receive/delete per message is billed too but made by
AWS, not our code: it is added as an estimate, named as such.

Latency: submit and status handler wall time per call (p50/p95/p99), and the share of it
spent inside our own AWS calls, so "our time" (validation, serialisation, Powertools)
reads against the time of the calls we make.

Bounded: `--tasks` tasks (default 50) and `--latency-calls` handler calls (default 200).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "local", REPO / "layers" / "common", *sorted(REPO.glob("functions/*"))):
    sys.path.insert(0, str(_path))

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from gpuqueue import aws_clients  # noqa: E402
from gpuqueue_local import moto_atomic  # noqa: E402
from gpuqueue_local.dynamodb_streams import StreamReader, streams_client  # noqa: E402
from gpuqueue_local.event_sources import (  # noqa: E402
    dynamodb_stream_event,
    filter_records,
    settle_batch,
    sqs_event,
)
from gpuqueue_local.lambda_worker import WorkerContext  # noqa: E402
from gpuqueue_local.provision import LocalStack, provision  # noqa: E402
from gpuqueue_local.standins.image_server import ImageServer, ImageServerKnobs  # noqa: E402
from gpuqueue_local.standins.webhook_receiver import WebhookReceiver  # noqa: E402

REGION = "us-east-1"
PHASES = ("submit", "dispatch", "task_events", "status_poll", "webhook")
# The priority dispatcher shares the dispatcher's code; its env would clash in one process.
SEPARATE_ENV = {"PriorityDispatcherFunction"}
# The fleet bench's fleet (bench_fleet.py): endpoints, and slots each.
FLEET_ENDPOINTS = 3
FLEET_SLOTS = 4
EVENTS = REPO / "events"


@dataclass
class CallCounter:
    """Counts AWS requests (service, operation) and the time spent in them."""

    phase: str = "setup"
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)

    def install(self) -> None:
        events = boto3._get_default_session().events
        events.register("before-call", self._before)
        events.register("after-call", self._after)

    def _before(self, model: Any, context: dict[str, Any], **_: Any) -> None:
        context["bench_started"] = time.perf_counter()
        with self._lock:
            service = model.service_model.service_name
            self.counts.setdefault(self.phase, Counter())[f"{service}:{model.name}"] += 1

    def _after(self, context: dict[str, Any], **_: Any) -> None:
        started = context.get("bench_started")
        if started is not None:
            with self._lock:
                self.seconds += time.perf_counter() - started

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        self.phase = phase
        try:
            yield
        finally:
            self.phase = "other"


def _context(name: str, timeout_s: float = 180.0) -> WorkerContext:
    return WorkerContext(
        function_name=name, memory_limit_in_mb=512, deadline=time.monotonic() + timeout_s
    )


def _event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return data


class InProcessStack:
    """The template's functions as modules in this process, on a provisioned moto stack."""

    def __init__(self, moto_url: str, image_urls: list[str]) -> None:
        os.environ["AWS_ENDPOINT_URL"] = moto_url
        fleet = [{"url": url, "capacity": FLEET_SLOTS} for url in image_urls]
        self.stack: LocalStack = provision(
            stack_name=f"bench-{uuid.uuid4().hex[:6]}",
            parameters={
                "ImageEndpoints": json.dumps(fleet),
                # The bench measures requests per task, not the limits: keep them out of
                # the way of a few hundred submits from one user.
                "SubmitBurst": "1000",
                "SubmitRatePerSecond": "1000",
                "MaxActiveTasksPerUser": "1000",
                "QueueCapacity": "100000",
                "UserQueueSharePercent": "100",
                "NewAccountHours": "0",
            },
        )
        for function in self.stack.functions():
            if function not in SEPARATE_ENV:
                os.environ.update(self.stack.function_env(function))
        os.environ["WEBHOOK_ALLOW_LOOPBACK"] = "true"
        # One probe round per checker run: the second round is 30 s of sleep, not requests.
        os.environ["SCHEDULE_PERIOD_SECONDS"] = os.environ["HEALTH_CHECK_PERIOD_SECONDS"]
        # Figures only on stdout: no log lines, no EMF blobs.
        os.environ["POWERTOOLS_LOG_LEVEL"] = "ERROR"
        os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
        aws_clients.reset()
        arn = self.stack.resolver.get_att("TasksTable", "StreamArn")
        self._stream = StreamReader(streams_client(), arn, "TRIM_HORIZON")
        self._sqs = boto3.client("sqs")
        self.user = str(uuid.uuid4())
        self.stream_batches = 0  # task-events invocations so far

    def http(
        self, module: str, sample: str, *, body: Any = None, path_task: str | None = None
    ) -> dict[str, Any]:
        event = _event(sample)
        claims = event["requestContext"]["authorizer"]["jwt"]["claims"]
        claims["sub"] = self.user
        if body is not None:
            event["body"] = json.dumps(body)
        if path_task is not None:
            event["pathParameters"] = {"task_id": path_task}
            route = event["requestContext"]["routeKey"].split(" ", 1)[1]
            path = route.replace("{task_id}", path_task)
            event["rawPath"] = event["requestContext"]["http"]["path"] = path
        result: dict[str, Any] = importlib.import_module(module).lambda_handler(
            event, _context(module, 30)
        )
        return result

    def submit(self, body: dict[str, Any]) -> str:
        result = self.http("submit_handler", "submit_image", body=body)
        assert result["statusCode"] == 202, result
        return str(json.loads(result["body"])["task_id"])

    def status(self, task_id: str) -> dict[str, Any]:
        result = self.http("tasks_handler", "tasks_get", path_task=task_id)
        assert result["statusCode"] == 200, result
        return dict(json.loads(result["body"]))

    def receive(self, queue: str = "TaskQueue") -> list[Any]:
        return list(
            self._sqs.receive_message(
                QueueUrl=self.stack.ref(queue), MaxNumberOfMessages=1, AttributeNames=["All"]
            ).get("Messages", [])
        )

    def run_sqs_function(self, module: str, queue: str, messages: list[Any]) -> None:
        event = sqs_event(
            messages, queue_arn=self.stack.resolver.get_att(queue, "Arn"), region=REGION
        )
        response = importlib.import_module(module).lambda_handler(event, _context(module))
        settle_batch(self._sqs, self.stack.ref(queue), messages, response)

    def pump_stream(self) -> int:
        records = self._stream.read()
        props = self.stack.template["Resources"]["TaskEventsFunction"]["Properties"]
        filters = props["Events"]["TaskTransitions"]["Properties"].get("FilterCriteria")
        passed = filter_records(filters, records, stream_arn=self._stream.stream_arn, region=REGION)
        # In batches of the mapping's BatchSize, as Lambda would hand them over.
        size = int(props["Events"]["TaskTransitions"]["Properties"]["BatchSize"])
        for start in range(0, len(passed), size):
            self.stream_batches += 1
            importlib.import_module("task_events_handler").lambda_handler(
                dynamodb_stream_event(
                    passed[start : start + size], self._stream.stream_arn, REGION
                ),
                _context("task_events"),
            )
        return len(passed)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(pick(0.95) * 1000, 2),
        "p99_ms": round(pick(0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def _timed(counter: CallCounter, calls: int, action: Callable[[], Any]) -> dict[str, float]:
    samples = []
    aws_before = counter.seconds
    for _ in range(calls):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    aws_seconds = counter.seconds - aws_before
    total = sum(samples)
    figures = _percentiles(samples)
    figures["aws_share"] = round(aws_seconds / total, 3) if total else 0.0
    figures["our_ms_per_call"] = round((total - aws_seconds) / calls * 1000, 2)
    figures["aws_ms_per_call"] = round(aws_seconds / calls * 1000, 2)
    return figures


LOAD_PHASES = ("submit", "dispatch", "task_events")


def _under_load(stack: InProcessStack, counter: CallCounter, tasks: int) -> dict[str, Any]:
    """`tasks` queued at once, then dispatched as the event source mapping would: each
    invocation gets one message (its receive and delete counted here, 2 requests) and its
    worker takes the rest of the queue itself; then the stream in one pass. Per task."""
    with counter.in_phase("load:submit"):
        ids = [
            stack.submit({"prompt": f"load {i}", "width": 64, "height": 64}) for i in range(tasks)
        ]
    invocations = 0
    with counter.in_phase("load:dispatch"):
        while messages := stack.receive():
            invocations += 1
            stack.run_sqs_function("dispatcher_handler", "TaskQueue", messages)
    batches_before = stack.stream_batches
    with counter.in_phase("load:task_events"):
        stack.pump_stream()
    done = sum(stack.status(task_id)["status"] == "DONE" for task_id in ids)
    per_task = {
        phase: {
            op: round(n / tasks, 2)
            for op, n in sorted(counter.counts.get(f"load:{phase}", Counter()).items())
        }
        for phase in LOAD_PHASES
    }
    return {
        "tasks": tasks,
        "done": done,
        "invocations": invocations,
        # The mapping's ReceiveMessage and DeleteMessage for each message it delivered.
        "mapping_requests_per_task": round(2 * invocations / tasks, 2),
        "dispatcher_invocations_per_task": round(invocations / tasks, 3),
        "stream_invocations_per_task": round((stack.stream_batches - batches_before) / tasks, 3),
        "requests_per_task": per_task,
    }


def measure(
    tasks: int,
    latency_calls: int,
    load_tasks: int = 100,
    before_latency: Callable[[], object] = lambda: None,
    load_call_seconds: float = 0.0,
) -> dict[str, Any]:
    """The counts, then (after `before_latency()` returns: the machine otherwise idle) the
    handler latencies. `load_call_seconds`: the stand-ins' call time under load (0: they
    answer at once, the control plane's own count; a GPU's seconds: what a kept slot's
    hand-offs cost when they are seconds apart)."""
    moto_atomic.install()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # The fleet bench's fleet (3 endpoints x 4 slots), answering at once: the counts are
    # the control plane's, and under load an invocation's workers hand off side by side.
    images = [ImageServer(knobs=ImageServerKnobs(latency_s=0.0)) for _ in range(FLEET_ENDPOINTS)]
    for image in images:
        image.start()
    counter = CallCounter()
    try:
        # The harness's own clients (the ESM's receive/delete, the stream reads) are made
        # before the hook: only clients made after it, the handlers', are counted.
        stack = InProcessStack(f"http://{host}:{port}", [image.url for image in images])
        counter.install()
        importlib.import_module("checker_handler").lambda_handler(
            _event("checker_schedule"), _context("checker", 70)
        )
        with WebhookReceiver() as sink:
            for i in range(tasks):
                body: dict[str, Any] = {"prompt": f"bench {i}", "width": 64, "height": 64}
                if i % 2:
                    body["webhook_url"] = sink.url
                with counter.in_phase("submit"):
                    task_id = stack.submit(body)
                with counter.in_phase("dispatch"):
                    stack.run_sqs_function("dispatcher_handler", "TaskQueue", stack.receive())
                with counter.in_phase("task_events"):
                    stack.pump_stream()
                with counter.in_phase("webhook"):
                    while messages := stack.receive("WebhookQueue"):
                        stack.run_sqs_function("webhook_handler", "WebhookQueue", messages)
                with counter.in_phase("status_poll"):
                    assert stack.status(task_id)["status"] == "DONE"
            webhooks_received = len(sink.received)
        for image in images:
            image.knobs.latency_s = load_call_seconds
        under_load = _under_load(stack, counter, load_tasks)
        under_load["call_seconds"] = load_call_seconds
        before_latency()
        with counter.in_phase("latency"):
            submit_latency = _timed(
                counter,
                latency_calls,
                lambda: stack.submit({"prompt": "latency", "width": 64, "height": 64}),
            )
            probe = stack.submit({"prompt": "probe", "width": 64, "height": 64})
            status_latency = _timed(counter, latency_calls, lambda: stack.status(probe))
    finally:
        for image in images:
            image.stop()
        server.stop()
    per_task = {
        phase: {
            op: round(n / (tasks if phase != "webhook" else max(1, tasks // 2)), 2)
            for op, n in sorted(counter.counts.get(phase, Counter()).items())
        }
        for phase in PHASES
    }
    return {
        "tasks": tasks,
        "webhook_tasks": tasks // 2,
        "webhooks_received": webhooks_received,
        "requests_per_task": per_task,
        "under_load": under_load,
        "submit_latency": submit_latency,
        "status_latency": status_latency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--load-tasks", type=int, default=100, help="queued at once")
    parser.add_argument(
        "--load-call-seconds", type=float, default=0.0, help="the stand-ins' call time under load"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", REGION),
    ):
        os.environ.setdefault(name, value)
    figures = measure(
        args.tasks, args.latency_calls, args.load_tasks, load_call_seconds=args.load_call_seconds
    )
    text = json.dumps(figures, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
