"""The task state machine's declaration (gpuqueue.task_states) and what must follow it: the
store's conditional writes, the reaper, the task-events stream filter, the client."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuqueue.lifecycle.reaper import ReaperPolicy
from gpuqueue.lifecycle.task_events import stream_filters
from gpuqueue.models import (
    OPEN_STATUSES,
    TERMINAL_STATUSES,
    CallbackLease,
    CallbackWait,
    Task,
    TaskProgress,
    TaskStatus,
)
from gpuqueue.store.task_store import Claim, TaskStore
from gpuqueue.task_states import (
    CANCEL,
    CANCEL_RUNNING,
    COMPLETE,
    INITIAL_STATUSES,
    REAP_STATE,
    REAPER_TRANSITIONS,
    REQUEST_CANCEL,
    TRANSITIONS,
    allowed,
)
from gpuqueue_local.template import load_template

CLIENT_DIR = Path(__file__).resolve().parents[3] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client.client import TERMINAL_STATUSES as CLIENT_TERMINAL_STATUSES  # noqa: E402

NOW = 1_700_000_000.0


# --- the declaration ------------------------------------------------------------------------


def test_a_final_state_is_never_left() -> None:
    leaving = [t.name for t in TRANSITIONS if t.sources & TERMINAL_STATUSES]
    assert leaving == []


def test_a_task_starts_open_and_every_open_state_is_reachable() -> None:
    assert INITIAL_STATUSES <= OPEN_STATUSES
    reachable = set(INITIAL_STATUSES) | {t.target for t in TRANSITIONS}
    assert reachable >= OPEN_STATUSES


def test_every_open_state_can_end() -> None:
    for status in OPEN_STATUSES:
        assert any(allowed(status, end) for end in TERMINAL_STATUSES), status


def test_every_open_state_has_its_reap_partition_and_reaper_rule() -> None:
    assert set(REAP_STATE) == OPEN_STATUSES
    assert set(REAPER_TRANSITIONS) == OPEN_STATUSES
    for status, choices in REAPER_TRANSITIONS.items():
        assert all(status in t.sources for t in choices), status
        assert ReaperPolicy(max_attempts=3).overdue_after(status) >= 0


def test_a_queued_task_is_canceled_at_once_and_a_running_one_on_request() -> None:
    assert allowed(TaskStatus.QUEUED, TaskStatus.CANCELED)
    assert allowed(TaskStatus.AWAITING_UPLOAD, TaskStatus.CANCELED)
    assert CANCEL.sources == {TaskStatus.QUEUED, TaskStatus.AWAITING_UPLOAD}
    # A running one: its owner's request is recorded, then whoever drives its call ends it.
    assert REQUEST_CANCEL.sources == {TaskStatus.RUNNING}
    assert REQUEST_CANCEL.target is TaskStatus.RUNNING
    assert TaskStatus.RUNNING in CANCEL_RUNNING.sources
    assert CANCEL_RUNNING.target is TaskStatus.CANCELED
    assert "progress" in CANCEL_RUNNING.clears


# --- the template and the client ------------------------------------------------------------


def test_the_stream_filter_is_what_the_task_events_consumer_needs() -> None:
    function = load_template()["Resources"]["TaskEventsFunction"]["Properties"]
    (event,) = function["Events"].values()
    patterns = [json.loads(f["Pattern"]) for f in event["Properties"]["FilterCriteria"]["Filters"]]

    assert patterns == stream_filters()


def test_the_client_waits_for_the_same_final_states() -> None:
    assert {s.value for s in TERMINAL_STATUSES} == set(CLIENT_TERMINAL_STATUSES)


# --- the store writes only declared transitions ---------------------------------------------


class RecordingTable:
    """Accepts every write and keeps its arguments; reads return `row`."""

    name = "tasks"

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.updates: list[dict[str, Any]] = []

    def update_item(self, **kwargs: Any) -> dict[str, Any]:
        self.updates.append(kwargs)
        return {"Attributes": self.row}

    def get_item(self, **_: Any) -> dict[str, Any]:
        return {"Item": self.row}


def _row(status: TaskStatus, **fields: Any) -> dict[str, Any]:
    return {
        "task_id": "task-1",
        "user_id": "alice",
        "status": status.value,
        "created_at": "2026-01-01T00:00:00.000000Z",
        "updated_at": "2026-01-01T00:00:00.000000Z",
        "lease_id": "lease-1",
        "lease_until": NOW - 600,
        **fields,
    }


def _claim(task: Task) -> Claim:
    return Claim(task=task, lease_id="lease-1")


# Every store method that changes a task's state, and the transition it must be held to.
WRITES: list[tuple[str, str, Callable[[TaskStore, Task], object]]] = [
    ("mark_uploaded", "uploaded", lambda s, t: s.mark_uploaded(t, now=NOW)),
    ("fail_unqueued", "fail unqueued", lambda s, t: s.fail_unqueued(t.task_id, "no queue")),
    ("expire_upload", "expire upload", lambda s, t: s.expire_upload(t.task_id)),
    ("cancel", "cancel", lambda s, t: s.cancel(t.task_id, "alice")),
    ("request_cancel", "request cancel", lambda s, t: s.request_cancel(t, "alice")),
    (
        "report_progress",
        "progress",
        lambda s, t: s.report_progress(_claim(t), TaskProgress.of(3, 30)),
    ),
    (
        "report_progress (rate-bound)",
        "progress",
        lambda s, t: s.report_progress(_claim(t), TaskProgress.of(3, 30), not_within=2, now=NOW),
    ),
    (
        "await_callback",
        "await callback",
        lambda s, t: s.await_callback(
            _claim(t),
            CallbackWait(
                prediction_id="task-1-a1",
                token_hash="0" * 64,
                lease_id="lease-1",
                endpoint_id="cog-1",
                leases=[CallbackLease(endpoint_id="cog-1", slot=0, lease_id="slot-lease")],
                started_at=NOW,
            ),
            lease_until=NOW + 125,
        ),
    ),
    ("cancel_running", "cancel running", lambda s, t: s.cancel_running(_claim(t))),
    ("end_canceled", "cancel running", lambda s, t: s.end_canceled(t)),
    ("claim", "claim", lambda s, t: s.claim(t, lease_seconds=30, now=NOW)),
    (
        "claim_unread",
        "claim",
        lambda s, t: s.claim_unread(
            t.task_id, lease_seconds=30, now=NOW, endpoint_id="gpu-a", max_attempts=3
        ),
    ),
    (
        "next_attempt",
        "next attempt",
        lambda s, t: s.next_attempt(_claim(t), lease_seconds=30, now=NOW, endpoint_id="gpu-b"),
    ),
    (
        "complete",
        "complete",
        lambda s, t: s.complete(_claim(t), result_key="results/task-1.png", endpoint_id="gpu-a"),
    ),
    (
        "release_for_retry",
        "retry",
        lambda s, t: s.release_for_retry(_claim(t), error="busy", endpoint_id="gpu-a"),
    ),
    ("hand_back", "hand back", lambda s, t: s.hand_back(_claim(t))),
    ("fail", "fail", lambda s, t: s.fail(_claim(t), error="bad input", endpoint_id="gpu-a")),
    ("expire", "expire", lambda s, t: s.expire(t, "too late")),
    ("fail_unclaimed", "fail unclaimed", lambda s, t: s.fail_unclaimed(t, "used up")),
    (
        "fail_dead_lettered",
        "fail dead-lettered",
        lambda s, t: s.fail_dead_lettered(t.task_id, "dead-lettered", now=NOW),
    ),
    (
        "requeue_abandoned",
        "requeue abandoned",
        lambda s, t: s.requeue_abandoned(t, now=NOW, error="lost"),
    ),
    ("fail_abandoned", "fail abandoned", lambda s, t: s.fail_abandoned(t, now=NOW, error="lost")),
    (
        "defer_resend",
        "resend",
        lambda s, t: s.defer_resend(t.task_id, seen_reap_at=NOW - 900, until=NOW + 900),
    ),
]
BY_NAME = {t.name: t for t in TRANSITIONS}


def _conditioned_states(update: dict[str, Any]) -> set[TaskStatus]:
    values = update["ExpressionAttributeValues"]
    states = {TaskStatus(v) for k, v in values.items() if k.startswith(":from")}
    assert "#s IN (" in update["ConditionExpression"]
    return states


def _written_status(update: dict[str, Any]) -> TaskStatus | None:
    names, values = update["ExpressionAttributeNames"], update["ExpressionAttributeValues"]
    for placeholder, attribute in names.items():
        if attribute == "status" and placeholder != "#s":
            return TaskStatus(values[":" + placeholder[1:]])
    return None


@pytest.mark.parametrize(("method", "transition", "write"), WRITES, ids=[w[0] for w in WRITES])
def test_each_write_moves_only_from_and_to_its_declared_states(
    method: str, transition: str, write: Callable[[TaskStore, Task], object]
) -> None:
    declared = BY_NAME[transition]
    row = _row(next(iter(declared.sources)), queue_ttl_seconds=60)
    table = RecordingTable(row)

    write(TaskStore(table), Task.model_validate(row))  # type: ignore[arg-type]

    (update,) = table.updates
    assert _conditioned_states(update) == declared.sources
    written = _written_status(update)
    assert written is (None if declared is BY_NAME["resend"] else declared.target)


def test_every_declared_transition_is_written_by_some_store_method() -> None:
    assert {name for _, name, _ in WRITES} == set(BY_NAME)


class PuttingTable(RecordingTable):
    def put_item(self, **kwargs: Any) -> None:
        self.updates.append(kwargs)


def test_a_task_is_never_created_in_a_state_it_cannot_start_in() -> None:
    table = PuttingTable(_row(TaskStatus.RUNNING))
    store = TaskStore(table)  # type: ignore[arg-type]
    running = Task.model_validate(_row(TaskStatus.RUNNING))

    with pytest.raises(ValueError, match="a task does not start RUNNING"):
        store._put_new(running, reap_at=NOW)

    assert table.updates == []


def test_a_field_the_transition_does_not_declare_is_never_written() -> None:
    row = _row(TaskStatus.RUNNING)
    table = RecordingTable(row)
    task = Task.model_validate(row)

    with pytest.raises(ValueError, match="complete does not write prompt"):
        TaskStore(table).complete(  # type: ignore[arg-type]
            _claim(task), result_key="r", endpoint_id="gpu-a", fields={"prompt": "changed"}
        )

    assert table.updates == []
    assert "prompt" not in COMPLETE.sets
