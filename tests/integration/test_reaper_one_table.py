"""The reaper's decisions on one tasks table (built from template.yaml), no stack: when a lost
run is put back, when it ends FAILED, when a queued task is re-sent or expired.

Fast on purpose: `make mutate` runs these against every mutant of reaper.py
(docs/mutation.md); tests/integration/test_reaper.py drives the same through the stack."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from gpuqueue.lifecycle.reaper import Reaper, ReaperPolicy
from gpuqueue.models import (
    ImageRequest,
    Priority,
    QueueMessage,
    SpeechInput,
    Task,
    TaskKind,
    TaskStatus,
)
from gpuqueue.store.task_ids import new_task_id
from gpuqueue.store.task_store import TaskStore
from gpuqueue.task_states import ReapState

GRACE = 60.0
REQUEUE_AFTER = 900.0


class Lane:
    """A task queue that keeps what it is sent."""

    def __init__(self) -> None:
        self.sent: list[QueueMessage] = []

    def send(self, message: QueueMessage, *, delay_seconds: int = 0) -> str:
        self.sent.append(message)
        return str(len(self.sent))


@pytest.fixture
def store(template_table: Callable[[str], Any]) -> TaskStore:
    return TaskStore(template_table("TasksTable"))


@pytest.fixture
def lanes() -> dict[Priority, Lane]:
    return {Priority.NORMAL: Lane(), Priority.HIGH: Lane()}


def reaper(store: TaskStore, lanes: dict[Priority, Lane], *, at: float, **policy: Any) -> Reaper:
    return Reaper(
        tasks=store,
        lanes=lanes,  # type: ignore[arg-type]
        policy=ReaperPolicy(
            **{
                "max_attempts": 2,
                "lease_grace_seconds": GRACE,
                "requeue_after_seconds": REQUEUE_AFTER,
                **policy,
            }
        ),
        clock=lambda: at,
    )


def queued(store: TaskStore, **request: Any) -> Task:
    return store.create_image_task(
        "alice", ImageRequest(prompt="a fox", **request), queue_ttl_seconds=3600
    )


def running(store: TaskStore, task: Task, *, error: str | None = None) -> Task:
    """Claimed by a worker that then died; `error`: an earlier attempt's."""
    claim = store.claim(task, lease_seconds=30, now=time.time(), endpoint_id="gpu-a")
    assert claim is not None
    if error:
        nxt = store.next_attempt(
            claim, lease_seconds=30, now=time.time(), endpoint_id="gpu-b", error=error
        )
        assert nxt is not None
        return nxt.task
    return claim.task


def test_a_lost_run_is_put_back_and_sent_again_only_once_its_grace_is_over(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    task = running(store, queued(store))
    lease_end = task.lease_until
    assert lease_end is not None

    within = reaper(store, lanes, at=lease_end + GRACE).run()
    assert within.total == 0
    assert store.get(task.task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]

    report = reaper(store, lanes, at=lease_end + GRACE + 1).run()

    assert report.requeued == [task.task_id]
    requeued = store.get(task.task_id)
    assert requeued is not None
    assert requeued.status is TaskStatus.QUEUED
    assert requeued.error == "the worker was lost during attempt 1 (its lease expired)"
    assert [m.task_id for m in lanes[Priority.NORMAL].sent] == [task.task_id]


def test_a_lost_last_attempt_ends_failed_naming_the_attempt_and_the_last_error(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    task = running(store, queued(store), error="gpu-a: HTTP 503")
    assert task.attempt == 2
    lease_end = task.lease_until
    assert lease_end is not None

    report = reaper(store, lanes, at=lease_end + GRACE + 1).run()

    assert report.failed == [task.task_id]
    failed = store.get(task.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == (
        "the worker was lost during attempt 2 (its lease expired); last error: gpu-a: HTTP 503"
    )
    assert lanes[Priority.NORMAL].sent == []


def test_a_lost_run_with_attempts_left_goes_back_to_its_own_lane(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    task = running(store, queued(store, priority=Priority.HIGH))
    assert task.lease_until is not None

    reaper(store, lanes, at=task.lease_until + GRACE + 1, max_attempts=3).run()

    assert [m.task_id for m in lanes[Priority.HIGH].sent] == [task.task_id]
    assert lanes[Priority.NORMAL].sent == []


def test_a_queued_task_is_re_sent_once_per_wait_and_the_wait_doubles(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    task = queued(store)
    queued_at = store.get(task.task_id).reap_at  # type: ignore[union-attr]
    assert queued_at is not None
    early = reaper(store, lanes, at=queued_at + REQUEUE_AFTER - 1).run()
    assert early.total == 0

    now = queued_at + REQUEUE_AFTER + 1
    first = reaper(store, lanes, at=now).run()

    assert first.resent == [task.task_id]
    assert [m.task_id for m in lanes[Priority.NORMAL].sent] == [task.task_id]
    after = store.get(task.task_id)
    assert after is not None
    assert after.resends == 1
    # Due again 2 x 900 s from now (reap_at counts from when it was queued).
    assert after.reap_at == pytest.approx(now + 2 * REQUEUE_AFTER - REQUEUE_AFTER, abs=0.01)
    assert reaper(store, lanes, at=now + 1).run().total == 0


def test_a_queued_task_never_started_past_its_deadline_expires_without_a_message(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    task = queued(store, queue_ttl_seconds=600)
    assert task.queue_deadline is not None

    report = reaper(store, lanes, at=task.queue_deadline + REQUEUE_AFTER).run()

    assert report.expired == [task.task_id]
    expired = store.get(task.task_id)
    assert expired is not None
    assert expired.status is TaskStatus.EXPIRED
    assert expired.error == "not started within its queue deadline (600 s)"
    assert lanes[Priority.NORMAL].sent == []


def test_a_lapsed_upload_window_expires_the_task(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    task = store.create_speech_task(
        "alice",
        SpeechInput(audio_key="audio/x", filename="x.wav", content_type="audio/wav", size_bytes=4),
        prompt=None,
        task_id=new_task_id(),
        queue_ttl_seconds=120,
        upload_window_seconds=60,
    )
    assert task.upload_deadline is not None

    report = reaper(store, lanes, at=task.upload_deadline + 301).run()

    assert report.expired == [task.task_id]
    assert store.get(task.task_id).status is TaskStatus.EXPIRED  # type: ignore[union-attr]


class StaleIndex(TaskStore):
    """The reaper's index read before the task moved on: `due` still lists these ids."""

    def __init__(self, store: TaskStore, table: Any, running: list[str]) -> None:
        super().__init__(table)
        self._running = running

    def due(self, state: ReapState, *, before: float, limit: int) -> list[str]:
        return list(self._running) if state is ReapState.RUNNING else []


def test_a_run_re_claimed_since_the_index_read_is_left_alone_while_within_its_grace(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    start = float(int(time.time()))  # whole seconds: the lease end below is exact
    task = queued(store)
    first = store.claim(task, lease_seconds=30, now=start)
    assert first is not None
    again = store.claim(first.task, lease_seconds=30, now=start + 31)  # its new lease
    assert again is not None
    lease_end = again.task.lease_until
    assert lease_end == start + 61
    stale = StaleIndex(store, store._table, [task.task_id])  # the same table

    for at in (lease_end + 1, lease_end + GRACE):  # ended, but within the grace
        assert reaper(stale, lanes, at=at, max_attempts=3).run().total == 0
    assert store.get(task.task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]
    after = reaper(stale, lanes, at=lease_end + GRACE + 1, max_attempts=3).run()
    assert after.requeued == [task.task_id]


def test_a_queued_task_at_exactly_its_deadline_is_re_sent_not_expired(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    task = queued(store, queue_ttl_seconds=1000)
    assert task.queue_deadline is not None

    report = reaper(store, lanes, at=task.queue_deadline).run()

    assert report.resent == [task.task_id]
    assert report.expired == []


def test_without_a_lane_of_its_own_a_task_goes_back_on_the_normal_lane_with_its_kind(
    store: TaskStore,
) -> None:
    normal = Lane()
    speech = store.create_speech_task(
        "alice",
        SpeechInput(audio_key="audio/x", filename="x.wav", content_type="audio/wav", size_bytes=4),
        prompt=None,
        task_id=new_task_id(),
        queue_ttl_seconds=120,
        upload_window_seconds=60,
        priority=Priority.HIGH,
    )
    uploaded = store.mark_uploaded(speech)
    assert uploaded is not None
    task = running(store, uploaded)
    assert task.lease_until is not None

    reaper(store, {Priority.NORMAL: normal}, at=task.lease_until + GRACE + 1).run()

    assert normal.sent == [
        QueueMessage(task_id=task.task_id, kind=TaskKind.SPEECH, priority=task.priority)
    ]


class ReadCounting(TaskStore):
    """Counts the task rows the reaper reads after its index query."""

    def __init__(self, table: Any) -> None:
        super().__init__(table)
        self.reads: list[str] = []

    def get(self, task_id: str) -> Task | None:
        self.reads.append(task_id)
        return super().get(task_id)


def test_a_run_asks_the_index_only_for_what_is_due_so_it_reads_nothing_else(
    template_table: Callable[[str], Any], lanes: dict[Priority, Lane]
) -> None:
    store = ReadCounting(template_table("TasksTable"))
    lost = running(store, queued(store))
    uploading = store.create_speech_task(
        "alice",
        SpeechInput(audio_key="audio/x", filename="x.wav", content_type="audio/wav", size_bytes=4),
        prompt=None,
        task_id=new_task_id(),
        queue_ttl_seconds=120,
        upload_window_seconds=60,
    )
    assert lost.lease_until is not None
    assert uploading.upload_deadline is not None
    # Both within their grace (lease: 60 s, upload window: 300 s) at this instant.
    at = min(lost.lease_until + GRACE - 1, uploading.upload_deadline + 299)
    store.reads.clear()

    assert reaper(store, lanes, at=at).run().total == 0

    assert store.reads == []  # not read: the index query left them out


class FirstReadGone:
    """The store, except that the first task it is asked for is gone (its row deleted by TTL
    between the index read and the read of the row)."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.gone: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get(self, task_id: str) -> Task | None:
        if self.gone is None:
            self.gone = task_id
            return None
        return self._store.get(task_id)


def test_a_due_task_whose_row_is_gone_is_skipped_and_the_others_are_still_handled(
    store: TaskStore, lanes: dict[Priority, Lane]
) -> None:
    tasks = [queued(store), queued(store)]
    latest = max(store.get(t.task_id).reap_at for t in tasks)  # type: ignore[union-attr,type-var]
    gone = FirstReadGone(store)

    report = reaper(gone, lanes, at=latest + REQUEUE_AFTER + 1).run()  # type: ignore[arg-type]

    assert gone.gone in {t.task_id for t in tasks}
    assert report.resent == [t.task_id for t in tasks if t.task_id != gone.gone]
