"""TaskTransition: which stream records end a task (and so release its owner's share)."""

from __future__ import annotations

from typing import Any

import pytest

from gpuqueue.lifecycle.task_events import TaskEvents, TaskTransition


def row(status: str | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {"task_id": "t-1", "user_id": "u-1", "status": status}


@pytest.mark.parametrize("final", ["DONE", "FAILED", "CANCELED", "EXPIRED"])
@pytest.mark.parametrize("active", ["AWAITING_UPLOAD", "QUEUED", "RUNNING"])
def test_a_move_from_an_active_state_to_a_final_one_ends_the_task(active, final):
    transition = TaskTransition.of(row(active), row(final))

    assert transition is not None
    assert transition.ended
    assert (transition.task_id, transition.user_id) == ("t-1", "u-1")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, "QUEUED"),  # created
        ("QUEUED", "RUNNING"),
        ("RUNNING", "QUEUED"),  # a retry
        ("RUNNING", "RUNNING"),  # a new lease
        ("DONE", "DONE"),  # a rewrite of a finished row
        ("FAILED", None),  # deleted by TTL
    ],
)
def test_other_writes_do_not_end_the_task(before, after):
    transition = TaskTransition.of(row(before), row(after))

    assert transition is not None
    assert not transition.ended


def test_a_row_that_is_not_a_task_is_ignored():
    assert TaskTransition.of(None, {"pk": "something else"}) is None


def test_an_unknown_status_is_not_taken_for_a_final_one():
    transition = TaskTransition.of(row("QUEUED"), row("ARCHIVED"))

    assert transition is not None
    assert transition.after is None
    assert not transition.ended


class RecordingShare:
    def __init__(self) -> None:
        self.released: list[tuple[str, str]] = []
        self.writes = 0

    def release_many(self, owner: str, task_ids: set[str]) -> None:
        self.writes += 1
        self.released.extend((owner, task_id) for task_id in sorted(task_ids))


def test_only_an_ending_releases_the_share():
    share = RecordingShare()
    events = TaskEvents(share=share)  # type: ignore[arg-type]

    for before, after in [("QUEUED", "RUNNING"), ("RUNNING", "DONE"), ("DONE", "DONE")]:
        transition = TaskTransition.of(row(before), row(after))
        assert transition is not None
        events.handle(transition)

    assert share.released == [("u-1", "t-1")]


class RecordingListener:
    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self.calls = 0

    def tasks_ended(self, tasks) -> None:
        self.calls += 1
        self.ended.extend((task.task_id, task.status.value) for task in tasks)


def full_row(status: str) -> dict[str, Any]:
    return {
        "task_id": "t-1",
        "user_id": "u-1",
        "status": status,
        "kind": "image",
        "prompt": "p",
        "created_at": "2026-11-23T10:00:00Z",
        "updated_at": "2026-11-23T10:00:05Z",
        "attempt": 1,
    }


def test_listeners_hear_of_each_ending_with_the_task_as_written():
    listener = RecordingListener()
    events = TaskEvents(share=None, listeners=[listener])

    for before, after in [("QUEUED", "RUNNING"), ("RUNNING", "FAILED")]:
        transition = TaskTransition.of(full_row(before), full_row(after))
        assert transition is not None
        events.handle(transition)

    assert listener.ended == [("t-1", "FAILED")]


def full_row_of(task_id: str, user_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return full_row(status) | {"task_id": task_id, "user_id": user_id} | extra


class RecordingPositions:
    def __init__(self) -> None:
        self.writes: list[tuple[str, list[float | None]]] = []

    def left_many(self, lane, times) -> None:
        self.writes.append((lane.value, list(times)))


def test_a_batch_releases_once_per_owner_calls_listeners_once_and_counts_each_lane_once():
    share, listener, positions = RecordingShare(), RecordingListener(), RecordingPositions()
    events = TaskEvents(share=share, listeners=[listener], positions=positions)  # type: ignore[arg-type]
    queued = {"attempt": 0}
    records = [
        # Three of alice's tasks and one of bob's end; two more of alice's start.
        (full_row_of("a1", "alice", "RUNNING"), full_row_of("a1", "alice", "DONE")),
        (full_row_of("a2", "alice", "QUEUED", **queued), full_row_of("a2", "alice", "CANCELED")),
        (full_row_of("b1", "bob", "RUNNING"), full_row_of("b1", "bob", "FAILED")),
        (full_row_of("a3", "alice", "QUEUED", **queued), full_row_of("a3", "alice", "RUNNING")),
        (
            full_row_of("a4", "alice", "QUEUED", **queued, priority="high"),
            full_row_of("a4", "alice", "RUNNING", priority="high"),
        ),
        (full_row_of("a5", "alice", "RUNNING"), full_row_of("a5", "alice", "DONE")),
    ]
    transitions = [TaskTransition.of(before, after) for before, after in records]

    events.handle_batch([t for t in transitions if t is not None])

    assert share.writes == 2  # alice's three in one write, bob's in another
    assert sorted(share.released) == [
        ("alice", "a1"),
        ("alice", "a2"),
        ("alice", "a5"),
        ("bob", "b1"),
    ]
    assert listener.calls == 1
    assert sorted(listener.ended) == [
        ("a1", "DONE"),
        ("a2", "CANCELED"),
        ("a5", "DONE"),
        ("b1", "FAILED"),
    ]
    # Departures from the line: a2 (canceled before it ran) and a3 in the normal lane, a4 in
    # the high one; one write per lane.
    assert sorted((lane, len(times)) for lane, times in positions.writes) == [
        ("high", 1),
        ("normal", 2),
    ]


def test_a_task_ending_twice_in_one_batch_is_released_and_told_once():
    share, listener = RecordingShare(), RecordingListener()
    events = TaskEvents(share=share, listeners=[listener])  # type: ignore[arg-type]
    ending = TaskTransition.of(full_row("RUNNING"), full_row("DONE"))
    assert ending is not None

    events.handle_batch([ending, ending])  # a repeated record

    assert share.released == [("u-1", "t-1")]
    assert listener.ended == [("t-1", "DONE")]
