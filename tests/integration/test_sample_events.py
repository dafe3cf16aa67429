"""The sample events in events/ for the stream, dead-letter and priority-lane functions do
what they say when handed to their handlers (as `sam local invoke` would)."""

from __future__ import annotations

import importlib

import boto3

from gpuqueue.intake.active_share import ActiveTaskShare
from gpuqueue.models import ImageRequest, Priority, TaskStatus
from gpuqueue.store.task_store import TaskStore
from gpuqueue_testing import FakeLambdaContext, load_event


def _tasks(h) -> TaskStore:
    return TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))


def test_the_task_events_sample_releases_the_finished_tasks_share(make_stack):
    h = make_stack()
    event = load_event("taskevents_stream")
    image = event["Records"][0]["dynamodb"]["NewImage"]
    owner, task_id = image["user_id"]["S"], image["task_id"]["S"]
    share = ActiveTaskShare(boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable")), limit=3)
    share.take(owner, task_id)
    share.take(owner, "still-running")

    handler = importlib.import_module("task_events_handler").lambda_handler
    response = handler(event, FakeLambdaContext("task_events"))

    assert response == {"batchItemFailures": []}
    assert share.active(owner) == {"still-running"}
    # Delivered again (streams are at-least-once): nothing more happens.
    assert handler(event, FakeLambdaContext("task_events")) == {"batchItemFailures": []}
    assert share.active(owner) == {"still-running"}


def test_the_dead_letter_sample_ends_its_task_failed(make_stack):
    h = make_stack()
    event = load_event("deadletter_sqs")
    task_id = "550e8400-e29b-41d4-a716-446655440000"
    assert task_id in event["Records"][0]["body"]
    _tasks(h).create_image_task(
        "owner", ImageRequest(prompt="lost"), queue_ttl_seconds=3600, task_id=task_id
    )

    handler = importlib.import_module("deadletter_handler").lambda_handler
    response = handler(event, FakeLambdaContext("deadletter"))

    assert response == {"batchItemFailures": []}
    task = _tasks(h).get(task_id)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert "dead-lettered" in task.error


def test_the_priority_dispatcher_sample_runs_its_high_priority_task(make_stack, monkeypatch):
    h = make_stack()
    h.run_checker()
    event = load_event("prioritydispatcher_sqs")
    task_id = "0c4b8e6a-2f1d-4d55-9a7e-8d3c2b1a0f99"
    assert task_id in event["Records"][0]["body"]
    _tasks(h).create_image_task(
        "owner",
        ImageRequest(prompt="first", priority=Priority.HIGH),
        queue_ttl_seconds=3600,
        task_id=task_id,
    )
    module = importlib.import_module("dispatcher_handler")
    module.deps.cache_clear()
    for name, value in h.stack.function_env("PriorityDispatcherFunction").items():
        monkeypatch.setenv(name, value)

    response = module.lambda_handler(event, FakeLambdaContext("priority_dispatcher"))

    assert response == {"batchItemFailures": []}
    task = _tasks(h).get(task_id)
    assert task is not None
    assert task.status is TaskStatus.DONE
    assert task.priority is Priority.HIGH


def test_the_webhook_sample_skips_a_task_without_a_webhook(make_stack):
    h = make_stack()
    _tasks(h).create_image_task(
        "owner",
        ImageRequest(prompt="quiet"),
        queue_ttl_seconds=3600,
        task_id="550e8400-e29b-41d4-a716-446655440000",
    )

    handler = importlib.import_module("webhook_handler").lambda_handler
    response = handler(load_event("webhook_delivery"), FakeLambdaContext("webhook"))

    assert response == {"batchItemFailures": []}
    task = _tasks(h).get("550e8400-e29b-41d4-a716-446655440000")
    assert task is not None
    assert task.deliveries == []
