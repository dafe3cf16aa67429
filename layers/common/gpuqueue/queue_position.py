"""Queue position and ETA of a waiting task, in O(1) per status request.

Each lane keeps two counters in the limits table (row `lane#<priority>`):
- `issued`: a ticket number taken by every task when it is queued (one atomic ADD);
- `left`: how many of them have left the waiting line (started for the first time, or ended
  before starting: canceled, expired, failed). The tasks table's stream counts them
  (TaskEventsFunction), so no code path that moves a task can forget to.

A task's position is the number of tasks queued before it that are still waiting:
`ticket - left - 1`, at least 0. It is exact when tasks start in the order they were queued;
SQS (standard) delivers roughly in that order, and a task leaving out of order (a cancel)
makes the estimate low by one for those queued before it. The stream runs ~0.25 s behind.

ETA: the healthy endpoints of the task's kind finish `sum(capacity / call seconds)` tasks a
second (their slots' measured call times); the task starts after `position` of them and
runs for one call. An estimate: retries, the priority lane and new endpoints move it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuqueue.endpoint_registry import Fleet
from gpuqueue.models import Priority, Task, TaskStatus

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

KEY_PREFIX = "lane#"


@dataclass(frozen=True)
class QueueEstimate:
    queue_position: int  # tasks ahead of this one in its lane
    eta_seconds: float | None  # until it is done; None until call times are measured


class QueuePositions:
    def __init__(self, table: Table) -> None:
        self._table = table

    def take_ticket(self, lane: Priority) -> int:
        answer = self._table.update_item(
            Key={"pk": KEY_PREFIX + lane.value},
            UpdateExpression="ADD issued :one",
            ExpressionAttributeValues={":one": 1},
            ReturnValues="UPDATED_NEW",
        )
        return int(answer["Attributes"]["issued"])  # type: ignore[arg-type]

    def left(self, lane: Priority) -> None:
        """One queued task stopped waiting (or a ticket was never used)."""
        self._table.update_item(
            Key={"pk": KEY_PREFIX + lane.value},
            UpdateExpression="ADD #left :one",
            ExpressionAttributeNames={"#left": "left"},
            ExpressionAttributeValues={":one": 1},
        )

    def position(self, task: Task) -> int | None:
        """Tasks ahead of this one; None unless it is QUEUED, has a ticket and never ran."""
        if task.status is not TaskStatus.QUEUED or task.ticket is None or task.attempt:
            return None
        item: dict[str, Any] = (
            self._table.get_item(Key={"pk": KEY_PREFIX + task.priority.value}).get("Item") or {}
        )
        return max(0, task.ticket - int(item.get("left", 0)) - 1)


def estimate(position: int, fleet: Fleet, *, now: float, max_age_seconds: float) -> QueueEstimate:
    """The ETA of a task with `position` tasks ahead of it on this fleet."""
    rates = []
    calls = []
    for endpoint in fleet.routable(now, max_age_seconds):
        seconds = fleet.service_seconds(endpoint)
        if seconds is None or seconds <= 0:
            continue
        rates.append(endpoint.usable_capacity / seconds)
        calls.append(seconds)
    if not rates:
        return QueueEstimate(queue_position=position, eta_seconds=None)
    own_call = sum(calls) / len(calls)
    return QueueEstimate(
        queue_position=position, eta_seconds=round(position / sum(rates) + own_call, 1)
    )
