"""A running task's progress and cancel asked on the tasks stream: which of its writes pass
the task-events function's filter, which of those are told to the running-task listeners
(the push), and that none of them reaches the end listeners (webhooks, outcome counts).

Each write below is a task_states transition applied to a running row as the store writes
it (its `sets` written, its `clears` removed), so a transition that changes what it clears
changes what these tests see.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from boto3.dynamodb.types import TypeSerializer

from gpuqueue.lifecycle.task_events import TaskEvents, TaskTransition, stream_filters
from gpuqueue.models import Task
from gpuqueue.task_states import CLAIM, NEXT_ATTEMPT, PROGRESS, REQUEST_CANCEL, Transition
from gpuqueue_local.event_sources import filter_records

SERIALIZER = TypeSerializer()


def progress(step: int, steps: int = 30, eta: str | None = "9.5") -> dict[str, Any]:
    item: dict[str, Any] = {
        "step": Decimal(step),
        "steps": Decimal(steps),
        "fraction": Decimal(str(round(step / steps, 4))),
    }
    if eta is not None:
        item["eta_seconds"] = Decimal(eta)
    return item


def running_row(task_id: str = "t-1", owner: str = "alice", **fields: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "user_id": owner,
        "status": "RUNNING",
        "kind": "image",
        "prompt": "a red fox",
        "created_at": "2026-11-23T10:00:00.000000Z",
        "updated_at": "2026-11-23T10:00:05.000000Z",
        "started_at": "2026-11-23T10:00:01.000000Z",
        "attempt": Decimal(1),
        "lease_id": "lease-1",
        "lease_until": Decimal("1790000100"),
        "endpoint_id": "gpu-1",
        "endpoint_protocol": "a1111",
        **fields,
    }


def written(row: dict[str, Any], transition: Transition, **sets: Any) -> dict[str, Any]:
    """The row after `transition` writes `sets` (only fields it declares) and its clears."""
    assert set(sets) <= transition.sets, set(sets) - transition.sets
    after = {k: v for k, v in row.items() if k not in transition.clears}
    return {
        **after,
        **sets,
        "status": transition.target.value,
        "updated_at": "2026-11-23T10:00:07.000000Z",
    }


def record(old: dict[str, Any], new: dict[str, Any], seq: int = 1) -> dict[str, Any]:
    """The stream record of that write, as GetRecords returns it (DynamoDB JSON images)."""

    def image(row: dict[str, Any]) -> dict[str, Any]:
        return {k: SERIALIZER.serialize(v) for k, v in row.items()}

    return {
        "eventID": f"id-{seq}",
        "eventName": "MODIFY",
        "eventVersion": "1.0",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": {
            "Keys": {"task_id": {"S": new["task_id"]}},
            "OldImage": image(old),
            "NewImage": image(new),
            "SequenceNumber": str(seq),
            "SizeBytes": 300,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }


def passes(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return bool(filter_records(stream_filters(), [record(old, new)]))


# --- the filter -----------------------------------------------------------------------------

WITH_PROGRESS = running_row(progress=progress(10))
ASKED = {"cancel_requested_at": "2026-11-23T10:00:06.000000Z"}

RUNNING_WRITES = {
    "first progress": (running_row(), written(running_row(), PROGRESS, progress=progress(4))),
    "next progress": (WITH_PROGRESS, written(WITH_PROGRESS, PROGRESS, progress=progress(16))),
    "cancel asked, no progress yet": (
        running_row(),
        written(running_row(), REQUEST_CANCEL, **ASKED),
    ),
    "cancel asked mid-run": (WITH_PROGRESS, written(WITH_PROGRESS, REQUEST_CANCEL, **ASKED)),
}
QUIET_WRITES = {
    # Another attempt elsewhere, under a fresh lease: progress starts over (cleared).
    "next attempt": (
        WITH_PROGRESS,
        written(
            WITH_PROGRESS,
            NEXT_ATTEMPT,
            lease_id="lease-2",
            lease_until=Decimal("1790000200"),
            attempt=Decimal(2),
            endpoint_id="gpu-2",
        ),
    ),
    # A new lease on a run whose worker died (its lease ended): claimed again, from scratch.
    "claim of an abandoned run": (
        WITH_PROGRESS,
        written(
            WITH_PROGRESS,
            CLAIM,
            lease_id="lease-2",
            lease_until=Decimal("1790000200"),
            attempt=Decimal(2),
            started_at="2026-11-23T10:05:00.000000Z",
        ),
    ),
    "next attempt after a cancel was asked": (
        running_row(**ASKED),
        written(running_row(**ASKED), NEXT_ATTEMPT, lease_id="lease-2", attempt=Decimal(2)),
    ),
}


@pytest.mark.parametrize("write", RUNNING_WRITES)
def test_progress_and_a_cancel_asked_pass_the_filter_and_are_told(write: str) -> None:
    old, new = RUNNING_WRITES[write]

    transition = TaskTransition.of(old, new)

    assert passes(old, new)
    assert transition is not None
    assert transition.progressed or transition.cancel_asked
    assert not transition.ended


@pytest.mark.parametrize("write", QUIET_WRITES)
def test_other_running_writes_never_reach_the_function(write: str) -> None:
    old, new = QUIET_WRITES[write]

    assert not passes(old, new)


def test_a_running_write_that_keeps_the_progress_passes_but_is_not_told() -> None:
    # A filter cannot compare the images: a write that leaves progress as it was (none of
    # today's transitions does, but a lease renewal would) costs an invocation share and
    # is dropped there.
    new = {**WITH_PROGRESS, "lease_until": Decimal("1790000300")}

    transition = TaskTransition.of(WITH_PROGRESS, new)

    assert passes(WITH_PROGRESS, new)
    assert transition is not None
    assert not transition.progressed
    assert not transition.cancel_asked


def test_the_writes_that_end_a_task_clear_its_progress_so_none_outlives_its_run() -> None:
    # What makes "the new image has progress" mean "progress was written".
    assert "progress" in CLAIM.clears
    assert "progress" in NEXT_ATTEMPT.clears
    assert PROGRESS.sources == {PROGRESS.target} == REQUEST_CANCEL.sources


# --- the consumer ---------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.ended: list[Task] = []
        self.changed: list[list[Task]] = []

    def tasks_ended(self, tasks: Sequence[Task]) -> None:
        self.ended.extend(tasks)

    def tasks_changed(self, tasks: Sequence[Task]) -> None:
        self.changed.append(list(tasks))


def transitions(*writes: tuple[dict[str, Any], dict[str, Any]]) -> list[TaskTransition]:
    found = [TaskTransition.of(old, new) for old, new in writes]
    assert all(t is not None for t in found)
    return [t for t in found if t is not None]


def test_progress_goes_to_the_running_listeners_only_never_to_the_end_listeners() -> None:
    webhooks, push = Recorder(), Recorder()
    events = TaskEvents(share=None, listeners=[webhooks], running_listeners=[push])

    events.handle_batch(transitions(RUNNING_WRITES["next progress"]))

    assert webhooks.ended == []
    [[told]] = push.changed
    assert told.progress is not None
    assert (told.progress.step, told.progress.steps) == (16, 30)


def test_a_batch_tells_each_task_once_as_it_last_stood() -> None:
    push = Recorder()
    events = TaskEvents(share=None, running_listeners=[push])
    a4 = running_row("a", progress=progress(4))
    a8 = written(a4, PROGRESS, progress=progress(8))
    b = running_row("b", owner="bob")
    b_asked = written(b, REQUEST_CANCEL, **ASKED)

    events.handle_batch(transitions((running_row("a"), a4), (a4, a8), (b, b_asked)))

    [told] = push.changed
    assert [(t.task_id, t.progress.step if t.progress else None) for t in told] == [
        ("a", 8),
        ("b", None),
    ]
    assert told[1].cancel_requested_at is not None


def test_a_task_that_ended_in_the_same_batch_is_not_told_its_progress() -> None:
    push = Recorder()
    events = TaskEvents(share=None, listeners=[push], running_listeners=[push])
    stepped = written(WITH_PROGRESS, PROGRESS, progress=progress(30, eta=None))
    done = {
        **{k: v for k, v in stepped.items() if k not in {"progress", "lease_until"}},
        "status": "DONE",
        "result_key": "results/t-1.png",
    }

    events.handle_batch(transitions((WITH_PROGRESS, stepped), (stepped, done)))

    assert push.changed == []
    assert [t.status.value for t in push.ended] == ["DONE"]
