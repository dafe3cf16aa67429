"""The dead-letter consumer's other answers: a message for no task, for a task that ended
anyway, a body that is no task message, and a write that another writer got in before.

Each dead-lettered message is consumed exactly once here (never a batch item failure, so it
does not circle in the dead-letter queue), and only a task this consumer ended counts as
failed (TasksFailed, TasksDeadLettered: what the failure alarms watch)."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest

from gpuqueue.lifecycle.dead_letters import DeadLetters, Settled
from gpuqueue.models import ImageRequest, QueueMessage, TaskStatus
from gpuqueue.store.task_store import TaskStore
from gpuqueue_testing import RacingTable


def _dead_letter(h, body: str) -> list[dict[str, Any]]:
    """`body` as the task dead-letter queue holds it after the queue gave up on it."""
    sqs = boto3.client("sqs")
    dlq = h.stack.ref("TaskDeadLetterQueue")
    sqs.send_message(QueueUrl=dlq, MessageBody=body)
    return list(sqs.receive_message(QueueUrl=dlq, AttributeNames=["All"])["Messages"])


def _settle(h, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return h.call_sqs_function("deadletter_handler", "TaskDeadLetterQueue", messages)


def _dead_letter_queue_depth(h) -> int:
    attrs = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.stack.ref("TaskDeadLetterQueue"), AttributeNames=["All"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def _failure_metrics(output: str) -> list[str]:
    names = []
    for line in output.splitlines():
        if '"_aws"' not in line:
            continue
        for directive in json.loads(line)["_aws"]["CloudWatchMetrics"]:
            names += [m["Name"] for m in directive["Metrics"]]
    return [n for n in names if n in ("TasksFailed", "TasksDeadLettered")]


def _tasks(h, table: Any = None) -> TaskStore:
    return TaskStore(table or boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))


def test_a_dead_lettered_message_for_an_unknown_task_is_dropped_and_creates_nothing(
    make_stack, capsys
):
    h = make_stack(endpoints=[])
    messages = _dead_letter(h, json.dumps({"task_id": "no-such-task", "kind": "image"}))
    capsys.readouterr()

    response = _settle(h, messages)

    assert response == {"batchItemFailures": []}
    assert _dead_letter_queue_depth(h) == 0
    assert _tasks(h).get("no-such-task") is None
    assert _failure_metrics(capsys.readouterr().out) == []


def test_a_dead_lettered_body_that_is_no_task_message_is_dropped(make_stack, capsys):
    # A poison message (it failed every delivery to the dispatcher too) must not circle
    # between the dead-letter queue and its consumer.
    h = make_stack(endpoints=[])
    messages = _dead_letter(h, "not json")
    capsys.readouterr()

    assert _settle(h, messages) == {"batchItemFailures": []}
    assert _dead_letter_queue_depth(h) == 0
    assert _failure_metrics(capsys.readouterr().out) == []


def test_a_task_done_before_its_message_was_dead_lettered_stays_done(make_stack, alice, capsys):
    # Given a task its dispatcher finished, whose message (never deleted: the worker's
    # answer was lost) the queue then moved to the dead-letter queue
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    delivered = h.receive()
    assert h.deliver(delivered) == []
    done = h.get_task(alice, task_id).json()
    assert done["status"] == "DONE"
    messages = _dead_letter(h, delivered[0]["Body"])
    capsys.readouterr()

    # When the dead-letter consumer gets it
    response = _settle(h, messages)

    # Then the task keeps its outcome, and nothing counts it as failed
    assert response == {"batchItemFailures": []}
    assert _dead_letter_queue_depth(h) == 0
    after = h.get_task(alice, task_id).json()
    assert after["status"] == "DONE"
    assert after.get("error") is None
    assert after["result_url"]
    assert after["updated_at"] == done["updated_at"]
    assert _failure_metrics(capsys.readouterr().out) == []


def test_a_task_canceled_before_its_message_was_dead_lettered_stays_canceled(make_stack, alice):
    h = make_stack(endpoints=[])
    task_id = h.submit(alice).json()["task_id"]
    body = h.receive()[0]["Body"]
    assert h.cancel(alice, task_id).status == 200

    assert _settle(h, _dead_letter(h, body)) == {"batchItemFailures": []}

    task = h.get_task(alice, task_id).json()
    assert task["status"] == "CANCELED"
    assert task.get("error") is None


# --- the lost write: another writer changed the task between the read and the write --------


def test_a_task_the_dispatcher_finishes_meanwhile_is_left_done(make_stack):
    h = make_stack(endpoints=[])
    tasks = _tasks(h)
    task_id = tasks.create_image_task(
        "owner", ImageRequest(prompt="late"), queue_ttl_seconds=3600
    ).task_id

    def dispatcher_finishes() -> None:
        queued = tasks.get(task_id)
        assert queued is not None
        claim = tasks.claim(queued, lease_seconds=60, now=time.time())
        assert claim is not None
        assert tasks.complete(claim, result_key=f"results/{task_id}.png", endpoint_id="gpu-1")

    racing = RacingTable(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))
    racing.race(dispatcher_finishes)

    settled = DeadLetters(_tasks(h, racing)).settle(QueueMessage(task_id=task_id), lane="task")

    assert racing.pending == 0  # the dispatcher's write did land first
    assert settled is Settled.ALREADY_ENDED
    task = tasks.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.DONE
    assert task.error is None


def test_a_task_deleted_meanwhile_is_unknown_and_not_written_back(make_stack):
    # Its retention ran out (the table's TTL) between the read and the write.
    h = make_stack(endpoints=[])
    tasks = _tasks(h)
    task_id = tasks.create_image_task(
        "owner", ImageRequest(prompt="old"), queue_ttl_seconds=3600
    ).task_id
    table = boto3.resource("dynamodb").Table(h.stack.ref("TasksTable"))
    racing = RacingTable(table).race(lambda: table.delete_item(Key={"task_id": task_id}))

    settled = DeadLetters(_tasks(h, racing)).settle(QueueMessage(task_id=task_id), lane="task")

    assert racing.pending == 0
    assert settled is Settled.UNKNOWN
    assert "Item" not in table.get_item(Key={"task_id": task_id})


@pytest.mark.parametrize(
    ("queue", "lane"),
    [("TaskDeadLetterQueue", "normal"), ("PriorityDeadLetterQueue", "high-priority")],
)
def test_the_recorded_reason_names_the_lane_and_keeps_the_last_error(make_stack, queue, lane):
    # Given a task whose last attempt failed and was released for a retry that never came
    h = make_stack(endpoints=[])
    tasks = _tasks(h)
    task = tasks.create_image_task("owner", ImageRequest(prompt="p"), queue_ttl_seconds=3600)
    claim = tasks.claim(task, lease_seconds=60, now=time.time())
    assert claim is not None
    assert tasks.release_for_retry(claim, error="attempt 1 on gpu-1: HTTP 500", endpoint_id=None)
    sqs = boto3.client("sqs")
    sqs.send_message(QueueUrl=h.stack.ref(queue), MessageBody=json.dumps({"task_id": task.task_id}))
    messages = sqs.receive_message(QueueUrl=h.stack.ref(queue))["Messages"]

    # When its message comes out of that lane's dead-letter queue
    response = h.call_sqs_function("deadletter_handler", queue, messages)

    # Then it ends FAILED saying which queue gave up on it, and what went wrong last
    assert response == {"batchItemFailures": []}
    failed = tasks.get(task.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == (
        f"dead-lettered: the {lane} queue delivered the task repeatedly with no outcome; "
        "last error: attempt 1 on gpu-1: HTTP 500"
    )
