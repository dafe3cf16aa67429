"""TaskTransition: which stream records end a task (and so release its owner's share)."""

from __future__ import annotations

from typing import Any

import pytest

from gpuqueue.task_events import TaskEvents, TaskTransition


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

    def release(self, owner: str, task_id: str) -> None:
        self.released.append((owner, task_id))


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

    def task_ended(self, task) -> None:
        self.ended.append((task.task_id, task.status.value))


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
