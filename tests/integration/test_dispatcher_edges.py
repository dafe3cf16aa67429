"""The dispatcher's error paths: input it cannot use, a kind nobody handles, too little time
left in the invocation, and a task another worker got hold of first.

What the dispatcher guarantees in each: a task it cannot run ends FAILED with its reason and
no GPU call; a task it has not claimed is left as it was (QUEUED, no attempt spent) with its
message back in the queue; a task another worker holds is that worker's to finish; and the
endpoint's slot is handed back whatever happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import boto3
import pytest

from gpuqueue.dispatch.dispatcher import (
    SAFETY_MARGIN_SECONDS,
    DispatchOutcome,
    DispatchPolicy,
    TaskDispatcher,
)
from gpuqueue.dispatch.jobs import ImageJob
from gpuqueue.errors import RetryLater
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.gpu.image_client import image_generators
from gpuqueue.models import QueueMessage, SpeechInput, TaskKind, TaskStatus
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_store import TaskStore
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_local.standins.speech_server import SpeechServerKnobs
from gpuqueue_testing import RacingTable

TASK_TIMEOUT = 10.0


def _tasks_table(h):
    return boto3.resource("dynamodb").Table(h.stack.ref("TasksTable"))


def _registry(h) -> EndpointRegistry:
    return EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))


def _live_leases(h, kind: TaskKind = TaskKind.IMAGE) -> list[str]:
    """Task ids holding a slot on any endpoint of `kind` now."""
    fleet = _registry(h).fleet(kind)
    now = time.time()
    return [
        lease.task_id
        for endpoint in fleet.endpoints
        for lease in fleet.live_leases(endpoint.endpoint_id, now)
    ]


def _dispatcher(
    h, *, tasks_table=None, kinds=(TaskKind.IMAGE,), circuit_failure_threshold: int = 3
) -> TaskDispatcher:
    """The dispatcher the handler builds, on this stack, with the given task table (a racing
    one, say) and jobs for `kinds` only."""
    jobs = {
        TaskKind.IMAGE: ImageJob(
            image_generators(), ImageStore(boto3.client("s3"), h.stack.ref("ImagesBucket"))
        )
    }
    return TaskDispatcher(
        tasks=TaskStore(tasks_table or _tasks_table(h)),
        registry=_registry(h),
        jobs={kind: job for kind, job in jobs.items() if kind in kinds},
        policy=DispatchPolicy(
            task_timeout_seconds=TASK_TIMEOUT,
            max_attempts=3,
            health_max_age_seconds=90,
            slot_wait_seconds=0,
            circuit_failure_threshold=circuit_failure_threshold,
        ),
    )


def _plenty() -> float:
    return 100.0


def _queued_image_task(h, alice) -> str:
    task_id: str = h.submit(alice).json()["task_id"]
    return task_id


# --- input it cannot use, a kind nobody handles ------------------------------------------


def test_a_speech_task_whose_audio_is_gone_fails_naming_it_without_a_call(make_stack, alice):
    # Given long audio that was uploaded and queued, and then deleted from the bucket
    h = make_stack(endpoints=[], speech=[SpeechServerKnobs()])
    h.run_checker()
    audio = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64
    started = h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/async",
        body={"filename": "talk.wav", "size_bytes": len(audio)},
        user=alice,
    ).json()
    task_id = started["task_id"]
    s3 = boto3.client("s3")
    bucket = h.stack.ref("ImagesBucket")
    s3.put_object(Bucket=bucket, Key=f"audio/{task_id}", Body=audio, ContentType="audio/wav")
    h.audio_uploaded(f"audio/{task_id}", len(audio))
    assert h.get_task(alice, task_id).json()["status"] == "QUEUED"
    s3.delete_object(Bucket=bucket, Key=f"audio/{task_id}")

    # When the dispatcher gets its message
    assert h.deliver(h.receive()) == []

    # Then it ends FAILED saying so, without spending an attempt or calling the endpoint
    task = h.get_task(alice, task_id).json()
    assert task["status"] == "FAILED"
    assert task["error"] == "the uploaded audio is gone"
    assert task["attempt"] == 0
    assert h.speech_servers[0].stats()["calls"] == 0
    assert _live_leases(h, TaskKind.SPEECH) == []


def test_a_task_of_a_kind_no_job_handles_fails_naming_the_kind(make_stack):
    # A dispatcher given jobs for images only (the handler gives it every kind).
    h = make_stack()
    h.run_checker()
    tasks = TaskStore(_tasks_table(h))
    speech = SpeechInput(
        audio_key="audio/t1", filename="talk.wav", content_type="audio/wav", size_bytes=10
    )
    waiting = tasks.create_speech_task(
        "owner",
        speech,
        prompt=None,
        task_id="t1",
        queue_ttl_seconds=3600,
        upload_window_seconds=600,
    )
    assert tasks.mark_uploaded(waiting) is not None

    outcome = _dispatcher(h).dispatch(
        QueueMessage(task_id="t1", kind=TaskKind.SPEECH), remaining_seconds=_plenty
    )

    assert outcome is DispatchOutcome.FAILED
    task = tasks.get("t1")
    assert task is not None
    assert (task.status, task.error, task.attempt) == (
        TaskStatus.FAILED,
        "no worker handles speech tasks",
        0,
    )
    assert h.image_servers[0].stats()["calls"] == 0


# --- too little time left in the invocation -----------------------------------------------


def test_too_little_time_for_a_call_leaves_the_task_untouched_and_its_message_back(
    make_stack, alice
):
    h = make_stack()
    h.run_checker()
    task_id = _queued_image_task(h, alice)
    messages = h.receive()
    before = h.task_row(task_id)

    # An invocation with less than a worthwhile call left after the safety margin.
    failed = h.deliver(messages, timeout_seconds=SAFETY_MARGIN_SECONDS + 0.5)

    # The message is a batch item failure, visible again at once (no backoff: nothing failed)
    assert failed == [messages[0]["MessageId"]]
    again = h.receive()
    assert [m["MessageId"] for m in again] == [messages[0]["MessageId"]]
    # and the task is as it was: QUEUED, no attempt spent, no error, no slot held.
    assert h.task_row(task_id) == before
    assert h.image_servers[0].stats()["calls"] == 0
    assert _live_leases(h) == []

    # A later invocation with time enough runs it.
    assert h.deliver(again) == []
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def _remaining(*seconds: float) -> tuple[Callable[[], float], Iterator[float]]:
    """The invocation's remaining time as the dispatcher reads it, one value per read."""
    values = iter(seconds)
    return (lambda: next(values)), values


def test_time_running_out_between_attempts_hands_the_task_back_with_the_error(make_stack, alice):
    # Given one failing endpoint, and an invocation whose time runs out after the first
    # failure: enough left for another full call when it failed, too little when the next
    # attempt starts (a slow write in between)
    h = make_stack(endpoints=[ImageServerKnobs(failure_rate=1.0)])
    h.run_checker()
    task_id = _queued_image_task(h, alice)
    remaining, unread = _remaining(
        100.0, SAFETY_MARGIN_SECONDS + TASK_TIMEOUT, SAFETY_MARGIN_SECONDS + 0.5
    )

    with pytest.raises(RetryLater) as retry:
        _dispatcher(h).dispatch(QueueMessage(task_id=task_id), remaining_seconds=remaining)

    assert list(unread) == []
    assert retry.value.delay_seconds == 0
    # Then the task is QUEUED again, its lease gone, the failed attempt's error on its row
    # (the next attempt starts elsewhere; the status API shows errors of ended tasks only)
    row = h.task_row(task_id)
    assert (row["status"], row["attempt"]) == ("QUEUED", 1)
    assert "lease_until" not in row
    assert row["error"].startswith("attempt 1 on ")
    assert row["error"].endswith("HTTP 500")
    assert h.get_task(alice, task_id).json()["status"] == "QUEUED"
    assert h.image_servers[0].stats()["calls"] == 1
    assert _live_leases(h) == []


def test_a_retry_that_finds_no_endpoint_left_hands_the_task_back_with_the_error(make_stack, alice):
    # Given the only endpoint fails, and its circuit opens on that one failure
    h = make_stack(endpoints=[ImageServerKnobs(failure_rate=1.0)])
    h.run_checker()
    task_id = _queued_image_task(h, alice)

    # When the retry in the same invocation looks for another endpoint
    with pytest.raises(RetryLater) as retry:
        _dispatcher(h, circuit_failure_threshold=1).dispatch(
            QueueMessage(task_id=task_id), remaining_seconds=_plenty
        )

    # Then the message is to come back later as a fresh copy, and the task waits QUEUED with
    # the failed attempt's error (no attempt spent on the wait itself)
    assert retry.value.requeue
    row = h.task_row(task_id)
    assert (row["status"], row["attempt"]) == ("QUEUED", 1)
    assert row["error"].endswith("HTTP 500")
    assert "lease_until" not in row
    assert h.image_servers[0].stats()["calls"] == 1
    assert _live_leases(h) == []


# --- another worker got hold of the task first -------------------------------------------


def test_a_claim_lost_to_another_worker_leaves_the_task_to_it(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = _queued_image_task(h, alice)
    tasks = TaskStore(_tasks_table(h))
    other: dict[str, str] = {}

    def another_worker_claims() -> None:
        queued = tasks.get(task_id)
        assert queued is not None
        claim = tasks.claim(queued, lease_seconds=60, now=time.time())
        assert claim is not None
        other["lease_id"] = claim.lease_id

    racing = RacingTable(_tasks_table(h)).race(another_worker_claims)

    outcome = _dispatcher(h, tasks_table=racing).dispatch(
        QueueMessage(task_id=task_id), remaining_seconds=_plenty
    )

    assert racing.pending == 0
    assert outcome is DispatchOutcome.SKIPPED
    row = h.task_row(task_id)
    assert (row["status"], row["attempt"], row["lease_id"]) == ("RUNNING", 1, other["lease_id"])
    assert h.image_servers[0].stats()["calls"] == 0
    assert _live_leases(h) == []  # the slot it had leased is handed back


def test_a_lease_taken_over_during_the_call_leaves_done_to_the_new_holder(make_stack, alice):
    # Given a call that outlives its lease: another worker re-claims the task meanwhile
    h = make_stack()
    h.run_checker()
    task_id = _queued_image_task(h, alice)
    tasks = TaskStore(_tasks_table(h))

    def another_worker_reclaims() -> None:
        running = tasks.get(task_id)
        assert running is not None
        assert running.status is TaskStatus.RUNNING
        later = time.time() + 3600  # past our lease
        assert tasks.claim(running, lease_seconds=60, now=later) is not None

    # Our claim goes through; the write of DONE comes after the other worker's claim.
    racing = RacingTable(_tasks_table(h)).race(None, another_worker_reclaims)

    outcome = _dispatcher(h, tasks_table=racing).dispatch(
        QueueMessage(task_id=task_id), remaining_seconds=_plenty
    )

    assert racing.pending == 0
    assert outcome is DispatchOutcome.SKIPPED
    # Then the task is not marked DONE by the worker that lost it: the holder finishes it,
    # writing the same result key (already there, so nothing is lost meanwhile).
    task = h.get_task(alice, task_id).json()
    assert (task["status"], task["attempt"]) == ("RUNNING", 2)
    assert task.get("error") is None
    s3 = boto3.client("s3")
    assert s3.head_object(Bucket=h.stack.ref("ImagesBucket"), Key=f"results/{task_id}.png")
    assert h.image_servers[0].stats()["calls"] == 1
    assert _live_leases(h) == []


def test_a_lease_taken_over_between_two_attempts_makes_no_second_call(make_stack, alice):
    # Given two failing endpoints: the first attempt fails on one, and before the next
    # attempt (on the other, in the same invocation) another worker re-claims the task
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0), ImageServerKnobs(failure_rate=1.0)]
    )
    h.run_checker()
    task_id = _queued_image_task(h, alice)
    tasks = TaskStore(_tasks_table(h))

    def another_worker_reclaims() -> None:
        running = tasks.get(task_id)
        assert running is not None
        assert tasks.claim(running, lease_seconds=60, now=time.time() + 3600) is not None

    racing = RacingTable(_tasks_table(h)).race(None, another_worker_reclaims)

    outcome = _dispatcher(h, tasks_table=racing).dispatch(
        QueueMessage(task_id=task_id), remaining_seconds=_plenty
    )

    assert racing.pending == 0
    assert outcome is DispatchOutcome.SKIPPED
    row = h.task_row(task_id)
    assert (row["status"], row["attempt"]) == ("RUNNING", 2)
    assert sorted(s.stats()["calls"] for s in h.image_servers) == [0, 1]
    assert _live_leases(h) == []
