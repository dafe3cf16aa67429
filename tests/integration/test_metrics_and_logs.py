"""What operators see: each function's EMF metrics (Powertools output on stdout) and its
structured logs, with the task id as the correlation id."""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.models import EndpointState, ImageRequest, TaskKind
from gpuqueue.store.task_store import TaskStore
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_local.standins.webhook_receiver import WebhookReceiver
from gpuqueue_testing import FakeLambdaContext, load_event


class Emitted:
    """The EMF blobs and log lines printed since the last `take`."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.blobs: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []

    def take(self) -> Emitted:
        # Powertools' handler writes to the stdout it first saw (maybe an earlier test's
        # capture): point it at this test's, as it is now (the call phase).
        for handler in _stream_handlers():
            handler.stream = sys.stdout
        self.blobs, self.logs = [], []
        for line in self._capsys.readouterr().out.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            (self.blobs if "_aws" in record else self.logs).append(record)
        return self

    def values(self, name: str, **dimensions: str) -> list[float]:
        found: list[float] = []
        for blob in self.blobs:
            if name in blob and all(blob.get(k) == v for k, v in dimensions.items()):
                found.extend(blob[name])
        return found

    def units(self) -> dict[str, str]:
        return {
            metric["Name"]: metric["Unit"]
            for blob in self.blobs
            for directive in blob["_aws"]["CloudWatchMetrics"]
            for metric in directive["Metrics"]
        }

    def namespaces(self) -> set[str]:
        return {
            directive["Namespace"]
            for blob in self.blobs
            for directive in blob["_aws"]["CloudWatchMetrics"]
        }


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    return [
        h for h in logging.getLogger("gpuqueue").handlers if isinstance(h, logging.StreamHandler)
    ]


def _gpuqueue_loggers() -> list[logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "gpuqueue"]
    return [logging.getLogger(n) for n in names]


@pytest.fixture
def emitted(capsys: pytest.CaptureFixture[str]) -> Iterator[Emitted]:
    before = [(h, h.stream) for h in _stream_handlers()]
    # The template's level (INFO) for the service logger and its children: a child logger
    # takes POWERTOOLS_LOG_LEVEL when its module is first imported, which in one test
    # process may be under the tests' quieter default.
    levels = [(logger, logger.level) for logger in _gpuqueue_loggers()]
    for logger, _ in levels:
        logger.setLevel(logging.INFO)
    yield Emitted(capsys)
    for logger, level in levels:
        logger.setLevel(level)
    for handler, stream in before:
        handler.stream = stream


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def test_a_finished_task_emits_its_counts_and_latencies(make_stack, alice, emitted):
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=0.2)])
    h.run_checker()
    emitted.take()

    task_id = h.submit(alice).json()["task_id"]
    assert emitted.take().values("TasksSubmitted") == [1.0]
    h.drain()
    emitted.take()

    assert emitted.values("TasksSucceeded") == [1.0]
    [generation] = emitted.values("GenerationLatency")
    [end_to_end] = emitted.values("EndToEndLatency")
    [queue_wait] = emitted.values("QueueWait")
    assert generation >= 200.0  # the stand-in takes 0.2 s
    assert end_to_end >= generation + queue_wait - 1.0
    assert 0.0 <= queue_wait < end_to_end
    units = emitted.units()
    assert {units[n] for n in ("GenerationLatency", "EndToEndLatency", "QueueWait")} == {
        "Milliseconds"
    }
    # gpuqueue/<stack> (the namespace is read when a module is first imported: in this
    # process that may have been for an earlier test's stack: `it-…`, test_gpu_credentials'
    # `itc-…`, or an in-process test's before any stack: the tests' default `gpuqueue-test`)
    [namespace] = emitted.namespaces()
    assert re.fullmatch(r"gpuqueue/itc?-[0-9a-f]{6}|gpuqueue-test", namespace), namespace
    assert all(blob["service"] == "gpuqueue" for blob in emitted.blobs)
    assert emitted.values("EndpointFailures") == []
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def test_a_failing_endpoint_emits_endpoint_failures_and_the_failure(make_stack, alice, emitted):
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0, fail_status=500)],
        parameters={"MaxAttempts": "2"},
    )
    h.run_checker()
    h.submit(alice)
    emitted.take()
    h.drain()
    emitted.take()
    assert emitted.values("EndpointFailures") == [1.0, 1.0]
    assert emitted.values("TasksFailed") == [1.0]
    assert emitted.values("TasksSucceeded") == []
    assert emitted.values("GenerationLatency") == []


def test_a_cancel_emits_tasks_canceled(make_stack, alice, emitted):
    h = make_stack()
    task_id = h.submit(alice).json()["task_id"]
    emitted.take()
    assert h.cancel(alice, task_id).status == 200
    assert emitted.take().values("TasksCanceled") == [1.0]


def test_the_checker_emits_healthy_endpoints_per_kind(make_stack, emitted):
    h = make_stack(endpoints=[ImageServerKnobs(), ImageServerKnobs()])
    emitted.take()
    h.run_checker()
    emitted.take()
    assert emitted.values("HealthyEndpoints", Kind="image") == [2.0]
    assert emitted.values("HealthyEndpoints", Kind="speech") == [0.0]
    assert emitted.values("ActiveEndpoints", Kind="image") == [2.0]
    assert emitted.values("ActiveEndpoints", Kind="speech") == [0.0]


def test_the_checker_counts_active_endpoints_down_or_not_but_not_drained_ones(make_stack, emitted):
    """What the healthy-endpoints alarm compares: a down endpoint should still be serving
    (it alarms), a drained one should not (it does not)."""
    h = make_stack(endpoints=[ImageServerKnobs(), ImageServerKnobs(), ImageServerKnobs()])
    h.run_checker()
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    down, drained, _up = sorted(registry.endpoints(TaskKind.IMAGE), key=lambda e: e.url)
    h.image_servers[[s.url for s in h.image_servers].index(down.url)].knobs.healthy = False
    registry.set_state(drained.endpoint_id, EndpointState.DRAINING)
    emitted.take()

    h.run_checker()

    emitted.take()
    assert emitted.values("ActiveEndpoints", Kind="image") == [2.0]
    assert emitted.values("HealthyEndpoints", Kind="image") == [1.0]


def test_the_reaper_emits_what_it_healed(make_stack, alice, emitted):
    h = make_stack(env={"REAPER_REQUEUE_AFTER_SECONDS": "0"})
    h.submit(alice)
    h.submit(alice)
    emitted.take()
    h.run_reaper()
    assert emitted.take().values("TasksReaped") == [2.0]


def test_the_dead_letter_consumer_emits_the_dead_lettered_task(make_stack, emitted):
    h = make_stack()
    event = load_event("deadletter_sqs")
    task_id = "550e8400-e29b-41d4-a716-446655440000"
    TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable"))).create_image_task(
        "owner", ImageRequest(prompt="lost"), queue_ttl_seconds=3600, task_id=task_id
    )
    emitted.take()
    handler = importlib.import_module("deadletter_handler").lambda_handler
    handler(event, FakeLambdaContext("deadletter"))
    emitted.take()
    assert emitted.values("TasksDeadLettered") == [1.0]
    assert emitted.values("TasksFailed") == [1.0]


def test_a_delivered_webhook_is_counted(make_stack, alice, emitted, receiver):
    h = make_stack()
    h.run_checker()
    h.submit(alice, {"prompt": "hooked", "webhook_url": receiver.url})
    emitted.take()
    h.finish_and_notify()
    assert emitted.take().values("WebhooksDelivered") == [1.0]


def test_logs_are_json_with_the_task_id_as_correlation_id(make_stack, alice, emitted):
    h = make_stack()
    h.run_checker()
    emitted.take()
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    canceled = h.submit(alice).json()["task_id"]
    h.cancel(alice, canceled)
    emitted.take()

    about_task = [line for line in emitted.logs if line.get("task_id") == task_id]
    functions = {line["function_name"] for line in about_task}
    assert {"submit_handler", "dispatcher"} <= functions
    assert all(line["correlation_id"] == task_id for line in about_task)
    [cancel_line] = [line for line in emitted.logs if line["message"] == "task canceled"]
    assert cancel_line["function_name"] == "tasks_handler"
    assert cancel_line["correlation_id"] == canceled
    assert all({"level", "message", "timestamp", "service"} <= line.keys() for line in about_task)

    # The next invocation starts clean: no task id left over from the last one.
    h.run_checker()
    checker_lines = emitted.take().logs
    assert checker_lines
    assert all("task_id" not in line for line in checker_lines)
