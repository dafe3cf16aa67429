"""The reaper: a crash between two steps heals by itself, on the next scheduled pass."""

from __future__ import annotations

import time
from typing import Any

import boto3
import pytest

from gpuqueue import aws_clients
from gpuqueue.lifecycle.reaper import Reaper, ReaperPolicy
from gpuqueue.models import Priority, SpeechInput, TaskStatus
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue.store.task_store import TaskStore
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import dynamodb_operations


class Crash(BaseException):
    """The process dying: nothing in the handler catches it (unlike an AWS error)."""


def _store(h: Any) -> TaskStore:
    return TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))


def _reaper(h: Any, clock: list[float], **policy: Any) -> Reaper:
    sqs = aws_clients.sqs()
    return Reaper(
        tasks=_store(h),
        lanes={
            Priority.NORMAL: TaskQueue(sqs, h.queue_url()),
            Priority.HIGH: TaskQueue(sqs, h.queue_url("high")),
        },
        policy=ReaperPolicy(**{"max_attempts": 3, **policy}),
        clock=lambda: clock[0],
    )


def _only_task_id(h: Any) -> str:
    items = boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")).scan()["Items"]
    assert len(items) == 1
    return str(items[0]["task_id"])


def _result_objects(h: Any) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(
        Bucket=h.stack.ref("ImagesBucket"), Prefix="results/"
    )
    return [o["Key"] for o in listed.get("Contents", [])]


def _queued_messages(h: Any) -> int:
    attrs = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.queue_url(), AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def test_crash_between_task_write_and_send_heals_after_one_reaper_pass(make_stack, alice):
    h = make_stack(env={"REAPER_REQUEUE_AFTER_SECONDS": "0"})
    h.run_checker()

    def die(**_: Any) -> None:
        raise Crash

    aws_clients.sqs().meta.events.register("before-call.sqs.SendMessage", die)
    with pytest.raises(Crash):
        h.submit(alice)
    aws_clients.sqs().meta.events.unregister("before-call.sqs.SendMessage", die)
    task_id = _only_task_id(h)
    assert h.task_row(task_id)["status"] == "QUEUED"
    assert h.receive() == []  # the message was never sent

    assert h.run_reaper() == {"resent": 1, "requeued": 0, "failed": 0, "expired": 0}
    h.drain()

    task = h.get_task(alice, task_id).json()
    assert task["status"] == "DONE"
    assert task["attempt"] == 1
    assert _result_objects(h) == [f"results/{task_id}.png"]
    assert h.image_servers[0].stats()["calls"] == 1
    assert "reap_shard" not in h.task_row(task_id)  # a finished task leaves the index


def test_running_task_whose_invocation_died_is_retried_after_its_lease(make_stack, alice):
    h = make_stack(env={"REAPER_LEASE_GRACE_SECONDS": "0"})
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    # A worker received the message (now invisible for the queue's 18 min), claimed the
    # task and died: its lease is over, and SQS would not bring the message back for long.
    assert len(h.receive()) == 1
    store = _store(h)
    task = store.get(task_id)
    assert task is not None
    assert store.claim(task, lease_seconds=-1, now=time.time()) is not None

    assert h.run_reaper()["requeued"] == 1
    row = h.task_row(task_id)
    assert row["status"] == "QUEUED"
    assert "worker was lost during attempt 1" in row["error"]
    # The dead worker's message stays invisible; the re-sent one is all there is to take.
    assert h.deliver(h.receive()) == []

    task_view = h.get_task(alice, task_id).json()
    assert task_view["status"] == "DONE"
    assert task_view["attempt"] == 2
    assert h.image_servers[0].stats()["calls"] == 1  # the dead worker never reached the GPU


def test_lost_worker_on_the_last_attempt_fails_the_task_with_the_reason(make_stack, alice):
    h = make_stack(parameters={"MaxAttempts": "1"}, env={"REAPER_LEASE_GRACE_SECONDS": "0"})
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    store = _store(h)
    task = store.get(task_id)
    assert task is not None
    assert store.claim(task, lease_seconds=-1, now=time.time()) is not None

    assert h.run_reaper()["failed"] == 1
    task_view = h.get_task(alice, task_id).json()
    assert task_view["status"] == "FAILED"
    assert "worker was lost during attempt 1" in task_view["error"]


def test_live_lease_and_fresh_queue_are_left_alone(make_stack, alice):
    h = make_stack()  # template defaults: 15 min before a re-send, 60 s lease grace
    h.run_checker()
    running = h.submit(alice).json()["task_id"]
    waiting = h.submit(alice).json()["task_id"]
    store = _store(h)
    task = store.get(running)
    assert task is not None
    assert store.claim(task, lease_seconds=120, now=time.time()) is not None

    assert h.run_reaper() == {"resent": 0, "requeued": 0, "failed": 0, "expired": 0}
    assert h.task_row(running)["status"] == "RUNNING"
    assert h.task_row(waiting)["status"] == "QUEUED"
    assert _queued_messages(h) == 2  # nothing re-sent


def test_a_lease_ended_within_the_grace_is_left_to_its_worker(make_stack, alice):
    # Template defaults (60 s of grace): a worker whose lease ended moments ago may still be
    # writing its result; only a lease ended longer ago than the grace means a lost worker.
    h = make_stack()
    h.run_checker()
    late, lost = h.submit(alice).json()["task_id"], h.submit(alice).json()["task_id"]
    store = _store(h)
    for task_id, ended_ago in ((late, 20), (lost, 90)):
        task = store.get(task_id)
        assert task is not None
        assert store.claim(task, lease_seconds=-ended_ago, now=time.time()) is not None

    assert h.run_reaper() == {"resent": 0, "requeued": 1, "failed": 0, "expired": 0}
    assert h.task_row(late)["status"] == "RUNNING"
    assert h.task_row(late)["attempt"] == 1
    assert h.task_row(lost)["status"] == "QUEUED"


def test_resend_of_a_task_whose_message_still_exists_runs_it_once(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    clock = [time.time() + 901]
    reaper = _reaper(h, clock, requeue_after_seconds=900)
    assert reaper.run().resent == [task_id]
    assert _queued_messages(h) == 2  # the original and the re-sent copy

    # Not again until the doubled wait (30 min after the re-send) has passed.
    clock[0] += 1799
    assert reaper.run().resent == []
    clock[0] += 2
    assert reaper.run().resent == [task_id]
    assert h.task_row(task_id)["resends"] == 2

    h.drain()
    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    assert h.image_servers[0].stats()["calls"] == 1
    assert _result_objects(h) == [f"results/{task_id}.png"]


def test_lost_message_past_the_queue_deadline_ends_expired_without_a_gpu_call(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "a fox", "queue_ttl_seconds": 60}).json()["task_id"]
    h.receive()  # the message is held by a worker that dies before reading the task
    clock = [time.time() + 120]
    assert _reaper(h, clock, requeue_after_seconds=60).run().expired == [task_id]
    task = h.get_task(alice, task_id).json()
    assert task["status"] == "EXPIRED"
    assert "queue deadline" in task["error"]
    assert h.image_servers[0].stats()["calls"] == 0


def test_upload_that_never_arrived_ends_expired(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs()])
    store = _store(h)
    task = store.create_speech_task(
        alice.sub,
        SpeechInput(
            audio_key="uploads/x/talk.wav",
            filename="talk.wav",
            content_type="audio/wav",
            size_bytes=1000,
        ),
        prompt=None,
        task_id="speech-never-uploaded",
        queue_ttl_seconds=3600,
        upload_window_seconds=10,
    )
    clock = [time.time() + 10 + 301]
    assert _reaper(h, clock).run().expired == [task.task_id]
    row = store.get(task.task_id)
    assert row is not None
    assert row.status is TaskStatus.EXPIRED
    assert row.error == "the audio upload never arrived"


def test_reaper_pass_queries_the_index_and_never_scans(make_stack, alice):
    h = make_stack(env={"REAPER_REQUEUE_AFTER_SECONDS": "0"})
    h.run_checker()
    for _ in range(3):
        h.submit(alice)
    with dynamodb_operations(aws_clients.dynamodb().meta.client) as operations:
        assert h.run_reaper()["resent"] == 3
    assert "Scan" not in operations
    # 4 shards x 3 states of index queries, then per due task one read and one write.
    assert operations.count("Query") == 12
    assert operations.count("GetItem") == 3
    assert operations.count("UpdateItem") == 3
