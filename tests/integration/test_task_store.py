"""TaskStore's transitions on one tasks table (built from template.yaml), no stack: each
state change is a conditional write that a stale or competing writer loses.

Fast on purpose (no stack, no handlers): `make mutate` runs these against every mutant of
task_store.py (docs/mutation.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gpuqueue.errors import StoreError, TaskNotFound, TaskStateConflict
from gpuqueue.models import (
    EndpointProtocol,
    ImageRequest,
    Priority,
    SpeechInput,
    Task,
    TaskKind,
    TaskProgress,
    TaskStatus,
    TaskView,
    WebhookEvent,
)
from gpuqueue.store.task_ids import issued_at, new_task_id
from gpuqueue.store.task_store import (
    BATCH_GET_LIMIT,
    BATCH_GET_ROUNDS,
    UNWRITTEN_GRACE_SECONDS,
    Claim,
    ClaimRefused,
    ProgressAck,
    TaskStore,
    reap_shard,
)
from gpuqueue.task_states import ReapState

OWNER = "alice"
LEASE = 30.0


@pytest.fixture
def table(template_table: Callable[[str], Any]) -> Any:
    return template_table("TasksTable")


@pytest.fixture
def store(table: Any) -> TaskStore:
    return TaskStore(table)


@pytest.fixture
def queued(store: TaskStore) -> Callable[..., Task]:
    def make(**request: Any) -> Task:
        return store.create_image_task(
            OWNER, ImageRequest(prompt="a fox", **request), queue_ttl_seconds=3600
        )

    return make


def _row(table: Any, task_id: str) -> dict[str, Any]:
    return dict(table.get_item(Key={"task_id": task_id}, ConsistentRead=True)["Item"])


def _awaiting_upload(store: TaskStore, *, window: int = 600, created: float | None = None) -> Task:
    return store.create_speech_task(
        OWNER,
        SpeechInput(audio_key="audio/x", filename="x.wav", content_type="audio/wav", size_bytes=4),
        prompt=None,
        task_id=new_task_id(),
        queue_ttl_seconds=120,
        upload_window_seconds=window,
        now=None if created is None else datetime.fromtimestamp(created, UTC),
    )


# A time with digits below the millisecond: stored times keep three decimals, no more, no less.
SUB_MS = 1_765_000_000.123456


def test_deadlines_leases_and_reap_times_are_kept_to_the_millisecond(
    store: TaskStore, table: Any
) -> None:
    image = store.create_image_task(
        OWNER,
        ImageRequest(prompt="a fox"),
        queue_ttl_seconds=60,
        now=datetime.fromtimestamp(SUB_MS, UTC),
    )
    speech = _awaiting_upload(store, window=600, created=SUB_MS)

    assert image.queue_deadline == round(SUB_MS + 60, 3)
    assert _row(table, image.task_id)["queue_deadline"] == Decimal(str(round(SUB_MS + 60, 3)))
    assert _row(table, image.task_id)["reap_at"] == Decimal(str(round(SUB_MS, 3)))
    assert speech.upload_deadline == round(SUB_MS + 600, 3)
    assert _row(table, speech.task_id)["upload_deadline"] == Decimal(str(round(SUB_MS + 600, 3)))
    assert _row(table, speech.task_id)["reap_at"] == Decimal(str(round(SUB_MS + 600, 3)))

    claim = store.claim(image, lease_seconds=2.5, now=SUB_MS)

    assert claim is not None
    assert claim.task.lease_until == round(SUB_MS + 2.5, 3)
    assert _row(table, image.task_id)["lease_until"] == Decimal(str(round(SUB_MS + 2.5, 3)))


def test_an_image_task_is_stored_with_everything_it_was_given(store: TaskStore, table: Any) -> None:
    created = int(time.time())
    now = datetime.fromtimestamp(created, UTC)
    request = ImageRequest(
        prompt="a fox",
        negative_prompt="blurry",
        webhook_url="https://example.com/hook",
    )

    task = store.create_image_task(OWNER, request, queue_ttl_seconds=60, now=now)

    stored = store.get(task.task_id)
    assert stored is not None
    for seen in (task, stored):
        assert (seen.kind, seen.status, seen.user_id) == (TaskKind.IMAGE, TaskStatus.QUEUED, OWNER)
        assert (seen.negative_prompt, seen.webhook_url) == ("blurry", "https://example.com/hook")
        assert seen.expires_at == created + 7 * 24 * 3600  # the store's retention
    assert _row(table, task.task_id)["kind"] == TaskKind.IMAGE.value


def test_a_task_past_its_retention_reads_as_gone(table: Any) -> None:
    store = TaskStore(table, retention=timedelta(seconds=-1))
    task = store.create_image_task(OWNER, ImageRequest(prompt="a fox"), queue_ttl_seconds=60)

    assert store.get(task.task_id) is None  # the table's TTL may not have removed it yet


def test_every_transition_stamps_the_time_it_was_made(store: TaskStore) -> None:
    an_hour_ago = datetime.fromtimestamp(time.time() - 3600, UTC)
    task = store.create_image_task(
        OWNER, ImageRequest(prompt="a fox"), queue_ttl_seconds=7200, now=an_hour_ago
    )

    claim = _claimed(store, task)

    assert datetime.fromisoformat(claim.task.updated_at) > an_hour_ago + timedelta(minutes=59)


# --- claim ------------------------------------------------------------------------------


def test_claim_runs_a_queued_task_under_a_lease(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    now = time.time()

    claim = store.claim(task, lease_seconds=LEASE, now=now, endpoint_id="gpu-a")

    assert claim is not None
    assert claim.task.status is TaskStatus.RUNNING
    assert claim.task.attempt == 1
    assert claim.task.lease_id == claim.lease_id
    assert claim.task.lease_until == pytest.approx(now + LEASE, abs=0.001)
    assert claim.task.endpoint_id == "gpu-a"
    assert claim.task.started_at is not None
    row = _row(table, task.task_id)
    # The reaper looks at it when its lease ends.
    assert row["reap_shard"] == reap_shard(task.task_id, ReapState.RUNNING)
    assert float(row["reap_at"]) == pytest.approx(now + LEASE, abs=0.001)


def test_only_one_of_two_claims_from_the_same_read_wins(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    now = time.time()
    first = store.claim(task, lease_seconds=LEASE, now=now)
    assert first is not None
    # The second delivery read the task QUEUED too; by now its lease is even over.
    assert store.claim(task, lease_seconds=LEASE, now=now + LEASE + 1) is None


def test_a_live_lease_is_never_taken_over_and_one_ending_exactly_now_neither(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    now = time.time()
    held = store.claim(task, lease_seconds=LEASE, now=now)
    assert held is not None
    running = held.task
    assert store.claim(running, lease_seconds=LEASE, now=now + 1) is None
    lease_end = running.lease_until
    assert lease_end is not None
    assert store.claim(running, lease_seconds=LEASE, now=lease_end) is None

    again = store.claim(running, lease_seconds=LEASE, now=lease_end + 0.01)

    assert again is not None
    assert again.task.attempt == 2
    assert again.lease_id != held.lease_id


def test_a_claim_without_an_endpoint_leaves_the_endpoint_unset(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    claim = store.claim(queued(), lease_seconds=LEASE, now=time.time())
    assert claim is not None
    assert claim.task.endpoint_id is None


def test_next_attempt_needs_the_current_lease_and_records_the_failed_attempt(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    now = time.time()
    claim = store.claim(queued(), lease_seconds=LEASE, now=now, endpoint_id="gpu-a")
    assert claim is not None

    nxt = store.next_attempt(
        claim, lease_seconds=LEASE, now=now + 5, endpoint_id="gpu-b", error="gpu-a: 503"
    )

    assert nxt is not None
    assert nxt.task.attempt == 2
    assert nxt.task.endpoint_id == "gpu-b"
    assert nxt.task.error == "gpu-a: 503"
    assert nxt.task.lease_until == pytest.approx(now + 5 + LEASE, abs=0.001)
    assert nxt.lease_id != claim.lease_id
    assert nxt.task.lease_id == nxt.lease_id
    # The old lease is gone: the attempt it would start is not ours.
    assert store.next_attempt(claim, lease_seconds=LEASE, now=now + 6, endpoint_id="c") is None
    # Each attempt's lease is its own: the third's makes the second's stale too.
    third = store.next_attempt(nxt, lease_seconds=LEASE, now=now + 7, endpoint_id="gpu-a")
    assert third is not None
    assert third.lease_id not in (claim.lease_id, nxt.lease_id)
    assert not store.complete(nxt, result_key="results/stale.png", endpoint_id="gpu-b")


def test_a_retry_names_the_endpoint_that_failed_not_the_one_claimed_first(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    claim = _claimed(store, queued())  # on gpu-a

    assert store.release_for_retry(claim, error="HTTP 503", endpoint_id="gpu-b")

    again = store.get(claim.task.task_id)
    assert again is not None
    assert (again.status, again.endpoint_id, again.error) == (
        TaskStatus.QUEUED,
        "gpu-b",
        "HTTP 503",
    )


def test_next_attempt_without_an_error_keeps_none(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    claim = store.claim(queued(), lease_seconds=LEASE, now=time.time())
    assert claim is not None
    nxt = store.next_attempt(claim, lease_seconds=LEASE, now=time.time(), endpoint_id="gpu-b")
    assert nxt is not None
    assert nxt.task.error is None


# --- writes while holding the lease -----------------------------------------------------


def _claimed(store: TaskStore, task: Task) -> Claim:
    claim = store.claim(task, lease_seconds=LEASE, now=time.time(), endpoint_id="gpu-a")
    assert claim is not None
    return claim


def _taken_over(store: TaskStore, claim: Claim) -> Claim:
    """Another worker re-claims the task once this claim's lease is over."""
    lease_end = claim.task.lease_until
    assert lease_end is not None
    other = store.claim(claim.task, lease_seconds=LEASE, now=lease_end + 1)
    assert other is not None
    return other


def test_complete_only_while_holding_the_lease(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    stale = _claimed(store, task)
    current = _taken_over(store, stale)
    assert not store.complete(stale, result_key="results/stale.png", endpoint_id="gpu-a")
    assert store.get(task.task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]

    assert store.complete(
        current, result_key="results/x.png", endpoint_id="gpu-b", fields={"transcript_text": "hi"}
    )

    row = _row(table, task.task_id)
    assert row["status"] == TaskStatus.DONE.value
    assert row["result_key"] == "results/x.png"
    assert row["endpoint_id"] == "gpu-b"
    assert row["transcript_text"] == "hi"
    for gone in ("lease_until", "error", "reap_shard", "reap_at"):
        assert gone not in row


def test_a_retry_after_an_error_completes_without_the_error(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    claim = _claimed(store, queued())
    nxt = store.next_attempt(
        claim, lease_seconds=LEASE, now=time.time(), endpoint_id="gpu-b", error="gpu-a: 503"
    )
    assert nxt is not None
    assert store.complete(nxt, result_key="results/y.png", endpoint_id="gpu-b")
    assert "error" not in _row(table, claim.task.task_id)


def test_a_claim_handed_back_uncalled_is_queued_again_without_an_error(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    claim = _claimed(store, task)
    before = time.time()

    assert store.hand_back(claim)

    row = _row(table, task.task_id)
    assert row["status"] == TaskStatus.QUEUED.value
    assert "error" not in row
    assert "lease_until" not in row
    # The attempt stays counted: back to 0, its next claim would count as a first departure.
    assert int(row["attempt"]) == 1
    assert row["reap_shard"] == reap_shard(task.task_id, ReapState.QUEUED)
    assert before - 1 <= float(row["reap_at"]) <= time.time() + 1
    # Given back: the claim can do nothing more, nor can a stale one hand it back.
    assert not store.complete(claim, result_key="results/late.png", endpoint_id="gpu-a")
    assert not store.hand_back(claim)
    again = store.claim(store.get(task.task_id), lease_seconds=LEASE, now=time.time())  # type: ignore[arg-type]
    assert again is not None
    assert again.task.attempt == 2


def test_release_for_retry_queues_it_again_with_the_error(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    claim = _claimed(store, task)
    before = time.time()

    assert store.release_for_retry(claim, error="gpu-a: 503", endpoint_id="gpu-a")

    row = _row(table, task.task_id)
    assert row["status"] == TaskStatus.QUEUED.value
    assert row["error"] == "gpu-a: 503"
    assert row["endpoint_id"] == "gpu-a"
    assert int(row["attempt"]) == 1
    assert "lease_until" not in row
    # Back in the reaper's QUEUED index, from now.
    assert row["reap_shard"] == reap_shard(task.task_id, ReapState.QUEUED)
    assert before - 1 <= float(row["reap_at"]) <= time.time() + 1
    # Released: the stale claim can do nothing more.
    assert not store.fail(claim, error="late")


def test_release_without_an_endpoint_keeps_the_one_recorded(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    assert store.release_for_retry(_claimed(store, task), error="no slot", endpoint_id=None)
    assert _row(table, task.task_id)["endpoint_id"] == "gpu-a"


def test_fail_while_holding_ends_failed(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    stale = _claimed(store, task)
    current = _taken_over(store, stale)
    assert not store.fail(stale, error="stale")

    assert store.fail(current, error="HTTP 400", endpoint_id="gpu-b")

    row = _row(table, task.task_id)
    assert row["status"] == TaskStatus.FAILED.value
    assert row["error"] == "HTTP 400"
    assert row["endpoint_id"] == "gpu-b"
    for gone in ("lease_until", "reap_shard", "reap_at"):
        assert gone not in row


def test_fail_without_an_endpoint_keeps_the_one_recorded(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    assert store.fail(_claimed(store, task), error="x")
    assert _row(table, task.task_id)["endpoint_id"] == "gpu-a"


# --- ending a task nobody holds ---------------------------------------------------------


def test_expire_ends_only_a_never_started_queued_task(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    fresh = queued()
    assert store.expire(fresh, "not started within its queue deadline")
    expired = store.get(fresh.task_id)
    assert expired is not None
    assert expired.status is TaskStatus.EXPIRED
    assert expired.error == "not started within its queue deadline"

    tried = queued()
    assert store.release_for_retry(_claimed(store, tried), error="503", endpoint_id=None)
    assert not store.expire(tried, "late")  # attempt 1: QUEUED again, but it did start
    assert store.get(tried.task_id).status is TaskStatus.QUEUED  # type: ignore[union-attr]


def test_fail_unclaimed_needs_the_attempt_it_read(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    claim = _claimed(store, task)
    assert not store.fail_unclaimed(task, "read before the claim")  # attempt moved on

    assert store.fail_unclaimed(claim.task, "gave up after 1 attempts")

    row = _row(table, task.task_id)
    assert row["status"] == TaskStatus.FAILED.value
    assert row["error"] == "gave up after 1 attempts"
    assert "lease_until" not in row
    assert not store.fail_unclaimed(Task.model_validate(row), "again")  # final stays final


def test_fail_unclaimed_ends_queued_and_awaiting_upload_tasks(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    assert store.fail_unclaimed(queued(), "no worker")
    assert store.fail_unclaimed(_awaiting_upload(store), "upload gone")


def test_dead_lettered_task_fails_unless_a_live_lease_holds_it(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    waiting = queued()
    assert store.fail_dead_lettered(waiting.task_id, "dead-lettered")
    assert _row(table, waiting.task_id)["status"] == TaskStatus.FAILED.value
    assert not store.fail_dead_lettered(waiting.task_id, "again")  # final stays final

    assert store.fail_dead_lettered(_awaiting_upload(store).task_id, "dead-lettered")

    running = _claimed(store, queued()).task
    lease_end = running.lease_until
    assert lease_end is not None
    assert not store.fail_dead_lettered(running.task_id, "x", now=lease_end - 1)
    assert not store.fail_dead_lettered(running.task_id, "x", now=lease_end)
    assert store.fail_dead_lettered(running.task_id, "lease over", now=lease_end + 0.01)
    row = _row(table, running.task_id)
    assert row["status"] == TaskStatus.FAILED.value
    assert row["error"] == "lease over"
    assert "lease_until" not in row


def test_a_missing_task_is_never_created_by_a_transition(store: TaskStore, table: Any) -> None:
    assert not store.fail_dead_lettered(new_task_id(), "x")
    assert not store.expire_upload(new_task_id())
    assert table.scan()["Items"] == []


def test_fail_unqueued_ends_a_queued_task(store: TaskStore, queued: Callable[..., Task]) -> None:
    task = queued()
    store.fail_unqueued(task.task_id, "the queue refused the message")
    failed = store.get(task.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "the queue refused the message"


# --- owner actions ----------------------------------------------------------------------


def test_the_owner_cancels_a_queued_or_awaiting_upload_task(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    assert store.cancel(queued().task_id, OWNER).status is TaskStatus.CANCELED
    assert store.cancel(_awaiting_upload(store).task_id, OWNER).status is TaskStatus.CANCELED


def test_cancel_of_another_users_task_is_not_found(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    with pytest.raises(TaskNotFound) as raised:
        store.cancel(task.task_id, "mallory")
    # The 404 a caller gets: the same words as for a task that does not exist.
    assert raised.value.message == f"task {task.task_id} not found"
    assert raised.value.field == "task_id"
    assert store.get(task.task_id).status is TaskStatus.QUEUED  # type: ignore[union-attr]


def test_cancel_of_a_running_task_is_a_conflict_naming_its_state(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    _claimed(store, task)
    with pytest.raises(TaskStateConflict) as raised:
        store.cancel(task.task_id, OWNER)
    assert raised.value.message == (
        f"task {task.task_id} is RUNNING on an endpoint whose protocol (unknown) cannot stop "
        "a job it has started; it will finish"
    )
    assert raised.value.field == "task_id"
    assert store.get(task.task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]


def test_a_running_cancel_is_requested_seen_by_the_progress_write_and_ends_canceled(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    claim = store.claim(
        task,
        lease_seconds=LEASE,
        now=time.time(),
        endpoint_id="gpu-a",
        endpoint_protocol=EndpointProtocol.A1111,
    )
    assert claim is not None
    assert store.report_progress(claim, TaskProgress.of(3, 30)) is ProgressAck.WRITTEN
    assert TaskView.of(store.get(task.task_id)).progress == TaskProgress.of(3, 30)  # type: ignore[arg-type]

    requested = store.cancel(task.task_id, OWNER)
    again = store.cancel(task.task_id, OWNER)  # asking twice changes nothing

    assert requested.status is TaskStatus.RUNNING
    assert TaskView.of(requested).cancel_requested
    assert again.cancel_requested_at == requested.cancel_requested_at
    assert store.report_progress(claim, TaskProgress.of(4, 30)) is ProgressAck.CANCEL_REQUESTED
    assert store.stop_asked(claim) is ProgressAck.CANCEL_REQUESTED
    assert store.cancel_running(claim)
    ended = store.get(task.task_id)
    assert ended is not None
    assert ended.status is TaskStatus.CANCELED
    assert ended.progress is None
    assert ended.result_key is None


def test_progress_never_goes_back_on_the_same_count_but_a_new_count_starts_afresh(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    claim = _claimed(store, queued())

    def shown() -> tuple[int, int]:
        progress = store.get(claim.task.task_id).progress  # type: ignore[union-attr]
        assert progress is not None
        return progress.step, progress.steps

    assert store.report_progress(claim, TaskProgress.of(85, 120)) is ProgressAck.WRITTEN
    # An older report handled late (webhooks side by side): refused, nothing to do.
    assert store.report_progress(claim, TaskProgress.of(75, 120)) is ProgressAck.TOO_SOON
    assert store.report_progress(claim, TaskProgress.of(85, 120)) is ProgressAck.TOO_SOON
    assert shown() == (85, 120)
    # A second bar (a refiner's) counts its own steps.
    assert store.report_progress(claim, TaskProgress.of(3, 20)) is ProgressAck.WRITTEN
    assert shown() == (3, 20)


def test_progress_from_a_lost_lease_is_refused_and_says_so(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    claim = _claimed(store, queued())
    other = _taken_over(store, claim)

    assert store.report_progress(claim, TaskProgress.of(1, 2)) is ProgressAck.LEASE_LOST
    assert store.stop_asked(claim) is ProgressAck.LEASE_LOST
    assert store.stop_asked(other) is ProgressAck.WRITTEN


class RivalBeforeWrite:
    """A tasks table on which `rival` runs once, just before the store's next write."""

    def __init__(self, table: Any, rival: Callable[[], object]) -> None:
        self._table = table
        self._rival: Callable[[], object] | None = rival

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)

    def update_item(self, **kwargs: Any) -> Any:
        rival, self._rival = self._rival, None
        if rival is not None:
            rival()
        return self._table.update_item(**kwargs)


def test_a_cancel_that_loses_to_a_claim_names_the_state_it_lost_to(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()  # read as QUEUED by the cancel, then claimed before its write
    racing = TaskStore(RivalBeforeWrite(table, lambda: _claimed(store, task)))

    with pytest.raises(TaskStateConflict) as raised:
        racing.cancel(task.task_id, OWNER)

    assert raised.value.message.startswith(f"task {task.task_id} is RUNNING ")


# --- uploads ----------------------------------------------------------------------------


def test_an_upload_queues_the_task_once_and_starts_its_queue_deadline(
    store: TaskStore, table: Any
) -> None:
    task = _awaiting_upload(store)
    now = time.time() + 1000  # the time given, not the clock's
    uploaded = store.mark_uploaded(task, ticket=7, now=now)

    assert uploaded is not None
    assert uploaded.status is TaskStatus.QUEUED
    assert uploaded.ticket == 7
    assert uploaded.queue_deadline == pytest.approx(now + 120, abs=0.001)
    assert _row(table, task.task_id)["reap_shard"] == reap_shard(task.task_id, ReapState.QUEUED)
    assert store.mark_uploaded(task, now=now) is None  # a repeated event


def test_an_upload_without_a_ticket_sets_none(store: TaskStore) -> None:
    uploaded = store.mark_uploaded(_awaiting_upload(store))
    assert uploaded is not None
    assert uploaded.ticket is None


def test_expire_upload_ends_only_a_task_still_waiting(store: TaskStore) -> None:
    task = _awaiting_upload(store)
    assert store.expire_upload(task.task_id)
    expired = store.get(task.task_id)
    assert expired is not None
    assert expired.status is TaskStatus.EXPIRED
    assert expired.error == "the audio upload never arrived"
    assert not store.expire_upload(task.task_id)


# --- active shares ----------------------------------------------------------------------


def test_inactive_among_names_ended_gone_and_lapsed_upload_tasks(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    now = time.time()
    running = _claimed(store, queued()).task.task_id
    waiting = queued().task_id
    done = queued()
    assert store.fail_unclaimed(done, "x")
    crashed_submit = new_task_id(now - UNWRITTEN_GRACE_SECONDS - 1)
    being_written = new_task_id(now - UNWRITTEN_GRACE_SECONDS + 5)
    # Windows measured from the test's clock, not from when the writes happen to run.
    upload_open = _awaiting_upload(store, window=600, created=now).task_id
    upload_lapsed = _awaiting_upload(store, window=1, created=now).task_id

    asked = [running, waiting, done.task_id, crashed_submit, being_written, upload_open]
    asked += [upload_lapsed, done.task_id]  # a repeated id is read once

    inactive = store.inactive_among(asked, now=now + 2)

    assert inactive == {done.task_id, crashed_submit, upload_lapsed}
    assert store.get(upload_lapsed).status is TaskStatus.EXPIRED  # type: ignore[union-attr]
    assert store.get(upload_open).status is TaskStatus.AWAITING_UPLOAD  # type: ignore[union-attr]


def test_inactive_among_reads_more_than_one_batch(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    ended = queued()
    assert store.fail_unclaimed(ended, "x")
    open_ids = [queued().task_id for _ in range(3)]
    old = time.time() - UNWRITTEN_GRACE_SECONDS - 1
    gone = [new_task_id(old) for _ in range(100)]

    inactive = store.inactive_among([*gone, *open_ids, ended.task_id])

    assert inactive == {*gone, ended.task_id}


class ThrottledReads:
    """A tasks table whose BatchGetItem leaves every second key unprocessed for the first
    `rounds` calls (DynamoDB does so when throttled), and counts the calls."""

    def __init__(self, table: Any, *, rounds: int) -> None:
        self._table = table
        self._client = table.meta.client
        self.name = table.name
        self.meta = self  # the store reaches the client as table.meta.client
        self.client = self
        self.rounds = rounds
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        request = RequestItems[self.name]
        keys = request["Keys"]
        self.calls.append(len(keys))
        if not self.rounds:
            answer = dict(self._client.batch_get_item(RequestItems=RequestItems))
            if not answer.get("UnprocessedKeys"):
                # Nothing left: the answer may leave the map out (moto sends it empty).
                answer.pop("UnprocessedKeys", None)
            if not answer["Responses"].get(self.name):
                # Nothing found: the table may be left out of the answer (moto names it).
                answer["Responses"].pop(self.name, None)
            return answer
        self.rounds -= 1
        served, left = keys[::2], keys[1::2]
        answer = dict(
            self._client.batch_get_item(RequestItems={self.name: {**request, "Keys": served}})
        )
        if left:
            answer["UnprocessedKeys"] = {self.name: {**request, "Keys": left}}
        return answer


def test_inactive_among_asks_again_for_what_a_throttled_read_left_out(
    table: Any, store: TaskStore, queued: Callable[..., Task]
) -> None:
    ended = [queued() for _ in range(4)]
    for task in ended:
        assert store.fail_unclaimed(task, "x")
    throttled = ThrottledReads(table, rounds=2)

    inactive = TaskStore(throttled).inactive_among([t.task_id for t in ended])

    assert inactive == {t.task_id for t in ended}
    assert throttled.calls == [4, 2, 1]  # half left out twice, then the last one read


def test_inactive_among_counts_what_stays_unread_as_active(
    table: Any, store: TaskStore, queued: Callable[..., Task]
) -> None:
    ended = [queued() for _ in range(16)]
    for task in ended:
        assert store.fail_unclaimed(task, "x")
    throttled = ThrottledReads(table, rounds=BATCH_GET_ROUNDS)

    inactive = TaskStore(throttled).inactive_among([t.task_id for t in ended])

    # 16 -> 8 -> 4 -> 2 read in the rounds; the last unread one counts as still active
    # (refusing a submit is the safe side; its share is released at the next look).
    assert throttled.calls == [16, 8, 4, 2]
    assert len(inactive) == 15
    assert inactive < {t.task_id for t in ended}


def test_an_id_left_unread_counts_as_active_even_with_no_row_behind_it(
    table: Any, store: TaskStore
) -> None:
    # Crashed submits, long ago: inactive when read (no row); the one the throttled rounds
    # leave unread is not known to be gone, so it counts as active.
    gone = [new_task_id(time.time() - UNWRITTEN_GRACE_SECONDS - 1) for _ in range(16)]
    throttled = ThrottledReads(table, rounds=BATCH_GET_ROUNDS)

    inactive = TaskStore(throttled).inactive_among(gone)

    assert throttled.calls == [16, 8, 4, 2]
    assert len(inactive) == 15
    assert inactive < set(gone)


def test_inactive_among_reads_every_id_of_a_batch_beyond_the_first(
    store: TaskStore, queued: Callable[..., Task], table: Any
) -> None:
    ended = queued()
    assert store.fail_unclaimed(ended, "x")
    # Submits that crashed before writing, long ago: inactive, and no row to write for each.
    gone = [new_task_id(time.time() - UNWRITTEN_GRACE_SECONDS - 1) for _ in range(BATCH_GET_LIMIT)]
    live = queued().task_id  # in the second batch: read, and still active
    counting = ThrottledReads(table, rounds=0)

    inactive = TaskStore(counting).inactive_among([*gone, ended.task_id, live])

    assert inactive == {*gone, ended.task_id}
    assert counting.calls == [BATCH_GET_LIMIT, 2]


# --- the reaper's side ------------------------------------------------------------------


def test_an_abandoned_run_is_requeued_only_after_its_lease_and_only_once(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    running = _claimed(store, queued()).task
    lease_end = running.lease_until
    assert lease_end is not None
    assert store.requeue_abandoned(running, now=lease_end, error="lost") is None

    requeued = store.requeue_abandoned(running, now=lease_end + 0.01, error="worker lost")

    assert requeued is not None
    assert requeued.status is TaskStatus.QUEUED
    assert requeued.error == "worker lost"
    assert "lease_until" not in _row(table, running.task_id)
    assert store.requeue_abandoned(running, now=lease_end + 1, error="again") is None


def test_an_abandoned_run_re_claimed_meanwhile_is_left_alone(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    first = _claimed(store, queued())
    _taken_over(store, first)
    lease_end = first.task.lease_until
    assert lease_end is not None
    assert not store.fail_abandoned(first.task, now=lease_end + 1, error="lost")
    assert store.get(first.task.task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]


def test_fail_abandoned_ends_it_failed(store: TaskStore, queued: Callable[..., Task]) -> None:
    running = _claimed(store, queued()).task
    lease_end = running.lease_until
    assert lease_end is not None
    assert store.fail_abandoned(running, now=lease_end + 1, error="lost during attempt 1")
    failed = store.get(running.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "lost during attempt 1"


def test_defer_resend_moves_the_reap_time_once_per_read(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    seen = float(_row(table, task.task_id)["reap_at"])

    assert store.defer_resend(task.task_id, seen_reap_at=seen, until=seen + 900)

    row = _row(table, task.task_id)
    assert float(row["reap_at"]) == pytest.approx(seen + 900)
    assert int(row["resends"]) == 1
    assert not store.defer_resend(task.task_id, seen_reap_at=seen, until=seen + 1800)
    assert store.defer_resend(task.task_id, seen_reap_at=seen + 900, until=seen + 2700)
    assert int(_row(table, task.task_id)["resends"]) == 2


def test_defer_resend_leaves_a_claimed_task_alone(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    task = queued()
    seen = float(_row(table, task.task_id)["reap_at"])
    claim = _claimed(store, task)
    assert not store.defer_resend(task.task_id, seen_reap_at=seen, until=seen + 900)
    assert _row(table, task.task_id)["lease_id"] == claim.lease_id


def test_due_finds_open_tasks_by_state_and_reap_time(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    waiting = [queued().task_id for _ in range(6)]
    now = time.time()
    running = _claimed(store, queued()).task
    lease_end = running.lease_until
    assert lease_end is not None

    assert sorted(store.due(ReapState.QUEUED, before=now + 1, limit=10)) == sorted(waiting)
    assert store.due(ReapState.QUEUED, before=now - 60, limit=10) == []
    assert len(store.due(ReapState.QUEUED, before=now + 1, limit=4)) == 4
    assert store.due(ReapState.RUNNING, before=lease_end, limit=10) == []
    assert store.due(ReapState.RUNNING, before=lease_end + 1, limit=10) == [running.task_id]


def test_due_finds_no_more_than_its_limit_in_one_shard_or_across_two(store: TaskStore) -> None:
    by_shard: dict[int, list[str]] = {}
    for _ in range(400):  # bounded: ids until two shards hold three each
        task_id = new_task_id()
        shard = int(reap_shard(task_id, ReapState.QUEUED).split("#")[1])
        by_shard.setdefault(shard, []).append(task_id)
    first, second = sorted(n for n, ids in by_shard.items() if len(ids) >= 3)[:2]
    lower, upper = by_shard[first][:3], by_shard[second][:3]
    for task_id in lower + upper:
        store.create_image_task(
            OWNER, ImageRequest(prompt="a fox"), queue_ttl_seconds=3600, task_id=task_id
        )
    before = time.time() + 1

    within_one = store.due(ReapState.QUEUED, before=before, limit=2)
    across_two = store.due(ReapState.QUEUED, before=before, limit=4)

    assert len(within_one) == 2
    assert set(within_one) < set(lower)
    # The shards are read in order, each for what is still missing: 3 here, then 1 more.
    assert len(across_two) == 4
    assert set(lower) < set(across_two)


def test_a_task_created_now_is_queued_in_the_reaper_index(
    store: TaskStore, table: Any, queued: Callable[..., Task]
) -> None:
    before = datetime.now(UTC).timestamp()
    task = queued(queue_ttl_seconds=90)
    row = _row(table, task.task_id)
    assert row["reap_shard"] == reap_shard(task.task_id, ReapState.QUEUED)
    assert before - 1 <= float(row["reap_at"]) <= time.time() + 1
    assert task.queue_deadline == pytest.approx(float(row["reap_at"]) + 90, abs=0.01)


def test_a_missing_id_counts_as_never_written_only_once_its_grace_is_over(
    store: TaskStore,
) -> None:
    task_id = new_task_id(1_800_000_000.0)
    issued = issued_at(task_id)
    assert issued == 1_800_000_000.0

    at_grace = store.inactive_among([task_id], now=issued + UNWRITTEN_GRACE_SECONDS)
    past_grace = store.inactive_among([task_id], now=issued + UNWRITTEN_GRACE_SECONDS + 0.01)

    assert at_grace == set()  # its submit may still be writing it
    assert past_grace == {task_id}


def test_an_upload_window_closing_exactly_now_is_still_open(store: TaskStore) -> None:
    task = _awaiting_upload(store)
    deadline = task.upload_deadline
    assert deadline is not None

    assert store.inactive_among([task.task_id], now=deadline) == set()
    assert store.get(task.task_id).status is TaskStatus.AWAITING_UPLOAD  # type: ignore[union-attr]
    assert store.inactive_among([task.task_id], now=deadline + 0.01) == {task.task_id}


# --- claim_unread: a task claimed without a read before it -----------------------------


def _claim_unread(store: TaskStore, task_id: str, *, here: str = "gpu-a", now: float | None = None):
    return store.claim_unread(
        task_id,
        lease_seconds=LEASE,
        now=time.time() if now is None else now,
        endpoint_id=here,
        max_attempts=2,
    )


def test_claim_unread_takes_a_queued_task_in_one_write_and_returns_it(
    store: TaskStore, queued: Callable[..., Task], table: Any
) -> None:
    task = queued()
    now = time.time()

    claim = _claim_unread(store, task.task_id, now=now)

    assert isinstance(claim, Claim)
    assert (claim.task.status, claim.task.attempt) == (TaskStatus.RUNNING, 1)
    assert claim.task.prompt == "a fox"  # the whole task, not only what the write set
    assert claim.task.started_at is not None
    assert claim.task.lease_id == claim.lease_id
    row = _row(table, task.task_id)
    assert (row["endpoint_id"], row["lease_id"]) == ("gpu-a", claim.lease_id)
    assert float(row["lease_until"]) == pytest.approx(now + LEASE, abs=0.01)
    assert row["reap_shard"] == reap_shard(task.task_id, ReapState.RUNNING)


def test_claim_unread_refuses_what_it_must_not_take_and_says_what_it_found(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    missing = _claim_unread(store, new_task_id())
    assert isinstance(missing, ClaimRefused)
    assert missing.task is None

    done = queued()
    claim = store.claim(done, lease_seconds=LEASE, now=time.time())
    assert claim is not None
    assert store.complete(claim, result_key="results/x.png", endpoint_id="gpu-a")
    refused = _claim_unread(store, done.task_id)
    assert isinstance(refused, ClaimRefused)
    assert refused.task is not None
    assert refused.task.status is TaskStatus.DONE

    running = queued()
    assert store.claim(running, lease_seconds=LEASE, now=time.time()) is not None
    refused = _claim_unread(store, running.task_id)
    assert isinstance(refused, ClaimRefused)
    assert refused.task is not None
    assert refused.task.status is TaskStatus.RUNNING


def test_claim_unread_takes_over_only_a_lease_that_ended(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    now = time.time()
    first = store.claim(task, lease_seconds=LEASE, now=now)
    assert first is not None
    lease_end = now + LEASE

    assert isinstance(_claim_unread(store, task.task_id, now=lease_end), ClaimRefused)
    taken = _claim_unread(store, task.task_id, now=lease_end + 0.01)
    assert isinstance(taken, Claim)
    assert taken.task.attempt == 2
    # The lease is the taker's own: the first holder's writes no longer land.
    assert taken.lease_id != first.lease_id
    assert not store.complete(first, result_key="results/late.png", endpoint_id="gpu-a")


def test_two_unread_claims_hold_leases_of_their_own(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    now = time.time()
    first = _claim_unread(store, task.task_id, now=now)
    assert isinstance(first, Claim)

    second = _claim_unread(store, task.task_id, now=now + LEASE + 1)  # the first's lease over

    assert isinstance(second, Claim)
    assert second.lease_id != first.lease_id
    assert not store.complete(first, result_key="results/late.png", endpoint_id="gpu-a")
    assert store.complete(second, result_key="results/x.png", endpoint_id="gpu-a")


def test_claim_unread_leaves_a_task_out_of_attempts_or_past_its_queue_deadline(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    used_up = queued()
    for _ in range(2):
        claim = store.claim(store.get(used_up.task_id), lease_seconds=LEASE, now=time.time())  # type: ignore[arg-type]
        assert claim is not None
        assert store.release_for_retry(claim, error="HTTP 503", endpoint_id="gpu-b")
    refused = _claim_unread(store, used_up.task_id)
    assert isinstance(refused, ClaimRefused)
    assert refused.task is not None
    assert refused.task.attempt == 2

    late = queued()
    deadline = late.queue_deadline
    assert deadline is not None
    assert isinstance(_claim_unread(store, late.task_id, now=deadline), Claim)  # at it: in time
    later = queued()
    refused = _claim_unread(store, later.task_id, now=deadline + 3600)
    assert isinstance(refused, ClaimRefused)
    assert refused.task is not None
    assert refused.task.status is TaskStatus.QUEUED
    # The queue deadline bounds the wait to start, not a retry: once started, a task past
    # it is still taken for its next attempt.
    started = queued()
    first = store.claim(started, lease_seconds=LEASE, now=time.time(), endpoint_id="gpu-b")
    assert first is not None
    assert store.release_for_retry(first, error="HTTP 503", endpoint_id="gpu-b")
    assert started.queue_deadline is not None
    retried = _claim_unread(store, started.task_id, now=started.queue_deadline + 3600)
    assert isinstance(retried, Claim)
    assert retried.task.attempt == 2


def test_claim_unread_does_not_send_a_retry_back_to_the_endpoint_that_failed_it(
    store: TaskStore, queued: Callable[..., Task]
) -> None:
    task = queued()
    claim = store.claim(task, lease_seconds=LEASE, now=time.time(), endpoint_id="gpu-a")
    assert claim is not None
    assert store.release_for_retry(claim, error="HTTP 503", endpoint_id="gpu-a")

    refused = _claim_unread(store, task.task_id, here="gpu-a")
    assert isinstance(refused, ClaimRefused)
    assert refused.task is not None
    assert (refused.task.endpoint_id, refused.task.error) == ("gpu-a", "HTTP 503")
    elsewhere = _claim_unread(store, task.task_id, here="gpu-b")
    assert isinstance(elsewhere, Claim)
    assert elsewhere.task.attempt == 2


def test_a_long_audio_task_is_stored_awaiting_its_upload_with_everything_it_was_given(
    store: TaskStore, table: Any
) -> None:
    now = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
    speech = SpeechInput(
        audio_key="audio/t-1",
        filename="talk.wav",
        content_type="audio/wav",
        size_bytes=48_000,
        language="de",
    )
    task_id = new_task_id()

    task = store.create_speech_task(
        OWNER,
        speech,
        prompt="names: Grüber",
        task_id=task_id,
        queue_ttl_seconds=120,
        upload_window_seconds=600,
        priority=Priority.HIGH,
        webhook_url="https://example.com/hook",
        webhook_events=[WebhookEvent.DONE],
        now=now,
    )

    stored = store.get(task_id)
    assert stored is not None
    assert stored.task_id == task.task_id
    assert (stored.kind, stored.status, stored.priority) == (
        TaskKind.SPEECH,
        TaskStatus.AWAITING_UPLOAD,
        Priority.HIGH,
    )
    assert (stored.user_id, stored.prompt, stored.speech) == (OWNER, "names: Grüber", speech)
    assert stored.created_at == stored.updated_at == "2026-12-06T12:00:00.000000Z"
    assert stored.upload_deadline == now.timestamp() + 600
    assert stored.queue_ttl_seconds == 120
    assert stored.expires_at == int(now.timestamp()) + 7 * 86_400
    assert (stored.webhook_url, stored.webhook_events) == (
        "https://example.com/hook",
        [WebhookEvent.DONE],
    )
    row = _row(table, task_id)
    assert row["reap_shard"] == reap_shard(task_id, ReapState.WAITING)
    assert float(row["reap_at"]) == now.timestamp() + 600
    # Ids are never reused: a second task under the same id is refused.
    with pytest.raises(StoreError):
        store.create_speech_task(
            OWNER,
            speech,
            prompt=None,
            task_id=task_id,
            queue_ttl_seconds=1,
            upload_window_seconds=1,
        )
    assert store.get(task_id).prompt == "names: Grüber"  # type: ignore[union-attr]
    # No prompt stored as an empty one.
    other = _awaiting_upload(store)
    assert other.prompt == ""
