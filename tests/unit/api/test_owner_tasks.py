"""OwnerTasks, the tasks routes' domain calls, on in-memory rows: what a caller sees of
their task (position, ETA, Prefer: wait) and the refusals before any AWS call."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import pytest

from gpuqueue.api.owner_tasks import ImageLinks, OwnerTasks
from gpuqueue.errors import TaskNotFound, TaskStateConflict
from gpuqueue.fleet.endpoint_registry import SLOT_ROW, EndpointRegistry
from gpuqueue.intake.queue_position import QueuePositions
from gpuqueue.models import Endpoint, Task, TaskKind, TaskStatus
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_store import TaskStore

NOW = 1_800_000_000.0


class RowTable:
    """get_item and query over rows kept by their key's value: the reads TaskStore.get,
    QueuePositions.lane and EndpointRegistry make."""

    def __init__(self, rows: dict[str, dict[str, Any]] | None = None) -> None:
        self.rows = rows or {}

    def get_item(self, *, Key: dict[str, str], **_: Any) -> dict[str, Any]:
        (value,) = Key.values()
        row = self.rows.get(value)
        return {"Item": row} if row is not None else {}

    def query(self, **_: Any) -> dict[str, Any]:
        return {"Items": list(self.rows.values())}


def _task(status: TaskStatus, *, owner: str = "alice", ticket: int | None = None) -> Task:
    return Task(
        task_id="t1",
        user_id=owner,
        status=status,
        created_at="2027-01-15T08:00:00+00:00",
        updated_at="2027-01-15T08:00:00+00:00",
        attempt=0,
        ticket=ticket,
    )


def _owner_tasks(
    task: Task,
    *,
    lane: dict[str, Any] | None = None,
    fleet: EndpointRegistry | None = None,
) -> OwnerTasks:
    tasks = RowTable({task.task_id: task.model_dump(mode="json")})
    limits = RowTable({"lane#normal": lane} if lane is not None else {})
    return OwnerTasks(
        TaskStore(cast(Any, tasks)),
        images=ImageLinks(
            store=ImageStore(cast(Any, None), "bucket"),
            url_ttl_seconds=300,
            kept=timedelta(days=7),
        ),
        positions=QueuePositions(cast(Any, limits)),
        fleet=fleet,
        health_max_age_seconds=30.0,
        clock=lambda: NOW,
    )


def _status(owner_tasks: OwnerTasks, prefer: str | None = None, owner: str = "alice") -> Any:
    return owner_tasks.status("t1", owner, prefer=prefer, remaining_seconds=lambda: 29.0)


def test_a_queued_task_shows_the_tasks_ahead_of_it_and_no_eta_without_a_fleet():
    answer = _status(_owner_tasks(_task(TaskStatus.QUEUED, ticket=5), lane={"left": 2}))

    assert answer.view.queue_position == 2
    assert answer.view.eta_seconds is None
    assert answer.headers == {}


def test_a_queued_task_gets_an_eta_from_the_lanes_measured_gap():
    endpoint = Endpoint(
        endpoint_id="gpu-1",
        url="http://gpu-1:8000",
        kind=TaskKind.IMAGE,
        capacity=1,
        healthy=True,
        last_checked_at=NOW - 1,
    )
    slot = {"row_type": SLOT_ROW, "slot_of": "gpu-1", "slot": 0, "call_seconds_ewma": 2.0}
    rows = {"gpu-1": endpoint.model_dump(mode="json"), "gpu-1#0": slot}
    fleet = EndpointRegistry(cast(Any, RowTable(rows)))
    lane = {"left": 0, "gap_seconds": 3}
    answer = _status(_owner_tasks(_task(TaskStatus.QUEUED, ticket=3), lane=lane, fleet=fleet))

    assert answer.view.queue_position == 2
    # 2 ahead at the lane's 3 s between departures, then its own 2 s call.
    assert answer.view.eta_seconds == pytest.approx(2 * 3 + 2.0)


def test_a_running_task_shows_no_position():
    answer = _status(_owner_tasks(_task(TaskStatus.RUNNING, ticket=5), lane={"left": 0}))

    assert answer.view.queue_position is None


def test_a_wait_on_a_final_task_is_applied_at_once():
    answer = _status(_owner_tasks(_task(TaskStatus.DONE)), prefer="wait=5")

    assert answer.view.status is TaskStatus.DONE
    assert answer.headers == {"Preference-Applied": "wait=5"}


def test_someone_elses_task_is_missing_for_every_route():
    owner_tasks = _owner_tasks(_task(TaskStatus.DONE, owner="bob"))

    with pytest.raises(TaskNotFound):
        _status(owner_tasks)
    with pytest.raises(TaskNotFound):
        owner_tasks.deliveries("t1", "alice")
    with pytest.raises(TaskNotFound):
        owner_tasks.redeliver("t1", "alice")
    with pytest.raises(TaskNotFound):
        owner_tasks.image_url("t1", "alice")


def test_no_redelivery_on_a_stack_without_webhooks():
    with pytest.raises(TaskStateConflict, match="no webhook_url"):
        _owner_tasks(_task(TaskStatus.DONE)).redeliver("t1", "alice")


def test_no_image_url_before_the_task_is_done():
    with pytest.raises(TaskStateConflict, match="QUEUED; no image yet"):
        _owner_tasks(_task(TaskStatus.QUEUED)).image_url("t1", "alice")
