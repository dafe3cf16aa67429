"""Per-user share of the queue: at most K active tasks, exact under concurrency, released on
every way a task can end (the tasks stream drives it; a full share is re-checked)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.exceptions import ClientError

from gpuqueue import aws_clients
from gpuqueue.errors import ActiveTaskLimit
from gpuqueue.intake.active_share import ActiveTaskShare
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.models import ImageRequest, TaskStatus
from gpuqueue.store.task_ids import new_task_id
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue.store.task_store import UNWRITTEN_GRACE_SECONDS, TaskStore
from gpuqueue_local.standins.image_server import ImageServerKnobs

LIMITS = {"MaxActiveTasksPerUser": "2", "SubmitBurst": "100", "SubmitRatePerSecond": "50"}


def _statuses(h, user, ids):
    return [h.get_task(user, task_id).json()["status"] for task_id in ids]


def test_the_submit_past_the_share_gets_429_naming_the_limit(make_stack, alice, bob):
    h = make_stack(parameters=LIMITS)
    first, second = h.submit(alice), h.submit(alice)

    refused = h.submit(alice)

    assert [first.status, second.status] == [202, 202]
    assert refused.status == 429
    body = refused.json()
    assert body["code"] == "ACTIVE_TASK_LIMIT"
    assert body["field"] == "active_tasks"
    assert "at most 2 active" in body["error"]
    assert refused.headers["x-activetasks-limit"] == "2"
    assert int(refused.headers["retry-after"]) > 0
    # Nothing was written or queued for the refused submit; other users are not affected.
    assert len(h.receive(max_messages=10)) == 2
    assert h.submit(bob).status == 202


def test_k_plus_one_concurrent_submits_create_exactly_k_tasks(make_stack):
    k = 4
    h = make_stack(parameters={**LIMITS, "MaxActiveTasksPerUser": str(k)})
    dynamodb = boto3.resource("dynamodb")
    tasks = TaskStore(dynamodb.Table(h.stack.ref("TasksTable")))
    service = SubmissionService(
        tasks=tasks,
        queue=TaskQueue(boto3.client("sqs"), h.queue_url()),
        capacity=1000,
        share=ActiveTaskShare(
            dynamodb.Table(h.stack.ref("LimitsTable")), limit=k, find_inactive=tasks.inactive_among
        ),
    )
    owner = str(uuid.uuid4())
    start = threading.Barrier(k + 1)

    def submit(i: int) -> str:
        start.wait(timeout=10)
        try:
            return service.submit_image(owner, ImageRequest(prompt=f"race {i}")).task_id
        except ActiveTaskLimit:
            return "refused"

    with ThreadPoolExecutor(max_workers=k + 1) as pool:
        outcomes = list(pool.map(submit, range(k + 1)))

    assert outcomes.count("refused") == 1
    created = {o for o in outcomes if o != "refused"}
    rows = tasks.list_for_owner(owner, limit=50, cursor=None).tasks
    assert {t.task_id for t in rows} == created
    assert len(h.receive(max_messages=10)) == k


def _take_without_a_row(h, user, issued: float) -> str:
    """A share taken by a submit that has not written its task row (yet, or ever)."""
    task_id = new_task_id(issued)
    limits = boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable"))
    ActiveTaskShare(limits, limit=2).take(user.sub, task_id)
    return task_id


def test_a_share_whose_task_row_is_still_being_written_is_not_taken_over(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    written = h.submit(alice).json()["task_id"]
    in_flight = _take_without_a_row(h, alice, time.time())

    assert h.submit(alice).status == 429
    assert h.active_tasks(alice) == {written, in_flight}


def test_a_share_left_by_a_submit_that_crashed_before_writing_is_reclaimed(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    h.submit(alice)
    # Issued longer ago than any submit runs (the grace): its row will never come.
    crashed = _take_without_a_row(h, alice, time.time() - UNWRITTEN_GRACE_SECONDS - 1)

    accepted = h.submit(alice)

    assert accepted.status == 202
    assert crashed not in h.active_tasks(alice)


def test_a_submit_whose_task_write_fails_hands_its_share_back_at_once(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    kept = h.submit(alice).json()["task_id"]
    table = h.stack.ref("TasksTable")

    def throttled(params: dict, **_: object) -> None:
        if params.get("TableName") == table:
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}},
                "PutItem",
            )

    events = aws_clients.dynamodb().meta.client.meta.events
    events.register("before-parameter-build.dynamodb.PutItem", throttled)
    try:
        failed = h.submit(alice)
    finally:
        events.unregister("before-parameter-build.dynamodb.PutItem", throttled)

    # A clear, retryable refusal (not a crash) ...
    assert failed.status == 503, failed.body
    assert failed.json()["code"] == "SERVICE_UNAVAILABLE"
    assert int(failed.headers["retry-after"]) > 0
    # The share taken for the unwritten task is back now, not after the reclaim grace: the
    # next submit (the user's second of two) is accepted.
    assert h.active_tasks(alice) == {kept}
    assert h.submit(alice).status == 202


def test_the_share_frees_when_a_task_finishes(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    ids = [h.submit(alice).json()["task_id"] for _ in range(2)]
    assert h.submit(alice).status == 429

    h.run_checker()
    h.drain()
    assert _statuses(h, alice, ids) == ["DONE", "DONE"]
    # The stream delivers each task's final write; the function releases both shares.
    h.pump_task_events()

    assert h.active_tasks(alice) == set()
    assert h.submit(alice).status == 202


def test_the_share_frees_when_a_task_fails_after_its_retries(make_stack, alice):
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0)],
        parameters={**LIMITS, "MaxAttempts": "2", "CircuitFailureThreshold": "10"},
    )
    ids = [h.submit(alice).json()["task_id"] for _ in range(2)]
    h.run_checker()

    h.drain()
    h.pump_task_events()

    assert _statuses(h, alice, ids) == ["FAILED", "FAILED"]
    assert h.active_tasks(alice) == set()
    assert h.submit(alice).status == 202


def test_retried_tasks_hold_one_share_each_until_they_end(make_stack, alice):
    # Round-robin: whichever way the endpoint ids sort, one task tries the failing one first.
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0), ImageServerKnobs()],
        parameters={**LIMITS, "DispatchStrategy": "round-robin"},
    )
    h.run_checker()
    ids = [h.submit(alice, {"prompt": f"task {i}"}).json()["task_id"] for i in range(2)]
    assert h.active_tasks(alice) == set(ids)

    h.drain()
    h.pump_task_events()

    assert max(int(h.task_row(i)["attempt"]) for i in ids) == 2  # one was retried
    assert _statuses(h, alice, ids) == ["DONE", "DONE"]
    assert h.active_tasks(alice) == set()
    assert [h.submit(alice).status for _ in range(3)] == [202, 202, 429]


def test_a_cancel_frees_the_share_even_before_the_stream_is_read(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    ids = [h.submit(alice).json()["task_id"] for _ in range(2)]
    assert h.cancel(alice, ids[0]).status == 200

    # No stream delivery yet: the full share is checked against the tasks it names.
    accepted = h.submit(alice)

    assert accepted.status == 202
    assert h.active_tasks(alice) == {ids[1], accepted.json()["task_id"]}
    # The late stream delivery of the cancel is harmless (the release is idempotent).
    h.pump_task_events()
    assert h.active_tasks(alice) == {ids[1], accepted.json()["task_id"]}


def test_an_expired_queue_deadline_frees_the_share(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    expired = h.submit(alice, {"prompt": "too late", "queue_ttl_seconds": 1}).json()["task_id"]
    h.submit(alice)
    time.sleep(1.1)  # the deadline is wall-clock time; nothing else to wait on

    h.run_checker()
    h.drain()
    h.pump_task_events()

    assert _statuses(h, alice, [expired]) == ["EXPIRED"]
    assert h.active_tasks(alice) == set()


def test_an_announced_upload_that_never_arrives_stops_holding_a_share(make_stack, alice):
    h = make_stack(parameters={**LIMITS, "MaxActiveTasksPerUser": "1"})
    announced = h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/async",
        body={"filename": "talk.wav", "size_bytes": 1000},
        user=alice,
    )
    assert announced.status == 202
    task_id = announced.json()["task_id"]
    assert h.submit(alice).status == 429  # the waiting upload holds the only share

    # Its upload window (URL lifetime + grace) is over.
    table = boto3.resource("dynamodb").Table(h.stack.ref("TasksTable"))
    table.update_item(
        Key={"task_id": task_id},
        UpdateExpression="SET upload_deadline = :past",
        ExpressionAttributeValues={":past": int(time.time()) - 1},
    )

    assert h.submit(alice).status == 202
    task = h.get_task(alice, task_id).json()
    assert task["status"] == "EXPIRED"
    assert "upload never arrived" in task["error"]


def test_a_dead_lettered_task_ends_failed_and_frees_its_share(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    task_id = h.submit(alice).json()["task_id"]
    sqs = boto3.client("sqs")
    # The queue gave up on the message (maxReceiveCount receives, no outcome): it is moved.
    message = h.receive()[0]
    dlq = h.stack.ref("TaskDeadLetterQueue")
    sqs.send_message(QueueUrl=dlq, MessageBody=message["Body"])
    sqs.delete_message(QueueUrl=h.queue_url(), ReceiptHandle=message["ReceiptHandle"])

    dead = sqs.receive_message(QueueUrl=dlq, AttributeNames=["All"])["Messages"]
    response = h.call_sqs_function("deadletter_handler", "TaskDeadLetterQueue", dead)
    h.pump_task_events()

    assert response == {"batchItemFailures": []}
    task = h.get_task(alice, task_id).json()
    assert task["status"] == "FAILED"
    assert "dead-lettered" in task["error"]
    assert h.active_tasks(alice) == set()


def test_a_dead_lettered_task_under_a_live_lease_is_looked_at_again_later(make_stack, alice):
    h = make_stack(parameters=LIMITS)
    task_id = h.submit(alice).json()["task_id"]
    tasks = TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))
    task = tasks.get(task_id)
    assert task is not None
    assert tasks.claim(task, lease_seconds=60, now=time.time()) is not None
    body = h.receive()[0]["Body"]
    dlq = h.stack.ref("TaskDeadLetterQueue")
    boto3.client("sqs").send_message(QueueUrl=dlq, MessageBody=body)
    dead = boto3.client("sqs").receive_message(QueueUrl=dlq)["Messages"]

    response = h.call_sqs_function("deadletter_handler", "TaskDeadLetterQueue", dead)

    assert response == {"batchItemFailures": [{"itemIdentifier": dead[0]["MessageId"]}]}
    assert tasks.get(task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]


def test_a_submit_refused_for_the_share_emits_a_limit_hit_metric(make_stack, alice, capsys):
    h = make_stack(parameters={**LIMITS, "MaxActiveTasksPerUser": "1"})
    h.submit(alice)
    capsys.readouterr()

    assert h.submit(alice).status == 429

    emitted = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line
    ]
    assert [m.get("ActiveTaskLimitHits") for m in emitted] == [[1.0]]
