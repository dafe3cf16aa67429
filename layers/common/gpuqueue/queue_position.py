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

ETA: the lane's measured departure rate - an EWMA of the time between two tasks leaving
its waiting line (`gap_seconds`, kept with the counters; a gap after a departure that left
the line empty, or over 2 minutes, measures idleness, not service, and is left out) - times
the position, plus one call of the task's own
(the fleet's measured call time). Before any gap is measured, the fleet's rate stands in:
its healthy endpoints finish `sum(capacity / call seconds)` tasks a second. Measuring
departures includes what call times miss: the work around each call, retries, the other
lane's share of the slots. Still an estimate: new endpoints or a burst of retries move it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from gpuqueue.dynamodb_conditions import is_conditional_failure
from gpuqueue.endpoint_registry import Fleet
from gpuqueue.models import Priority, Task, TaskStatus

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

KEY_PREFIX = "lane#"
GAP_EWMA_ALPHA = 0.3
MAX_GAP_SECONDS = 120.0  # a longer gap between departures: the line was empty
GAP_ROUNDS = 3  # optimistic-concurrency tries for the gap; then only the count is kept


@dataclass(frozen=True)
class LaneState:
    left: int
    gap_seconds: float | None  # measured time between departures (None: not yet)


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

    def left(self, lane: Priority, *, at: float | None = None) -> None:
        """One queued task stopped waiting at `at` (epoch seconds; None: a ticket never used,
        which counts without timing anything)."""
        key = {"pk": KEY_PREFIX + lane.value}
        if at is not None:
            for _ in range(GAP_ROUNDS):
                if self._left_timed(key, at):
                    return
        self._table.update_item(
            Key=key,
            UpdateExpression="ADD #left :one",
            ExpressionAttributeNames={"#left": "left"},
            ExpressionAttributeValues={":one": 1},
        )

    def _left_timed(self, key: dict[str, str], at: float) -> bool:
        """Count the departure and fold its gap into the EWMA, if nobody wrote meanwhile."""
        item: dict[str, Any] = self._table.get_item(Key=key, ConsistentRead=True).get("Item") or {}
        last = item.get("last_left_at")
        # Did this departure empty the line? Then the next gap includes idle time.
        waiting_after = int(item.get("issued", 0)) - int(item.get("left", 0)) - 1
        sets = ["last_left_at = :at", "emptied = :emptied"]
        values: dict[str, Any] = {
            ":one": 1,
            ":at": Decimal(str(round(at, 3))),
            ":emptied": waiting_after <= 0,
        }
        if last is not None:
            gap = at - float(last)
            if gap < 0:
                return False  # an older departure arriving late: count it only
            if gap <= MAX_GAP_SECONDS and not item.get("emptied", False):
                old = item.get("gap_seconds")
                new = (
                    gap if old is None else GAP_EWMA_ALPHA * gap + (1 - GAP_EWMA_ALPHA) * float(old)
                )
                sets.append("gap_seconds = :gap")
                values[":gap"] = Decimal(str(round(new, 4)))
            values[":last"] = last
            condition = "last_left_at = :last"
        else:
            condition = "attribute_not_exists(last_left_at)"
        try:
            self._table.update_item(
                Key=key,
                UpdateExpression="SET " + ", ".join(sets) + " ADD #left :one",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#left": "left"},
                ExpressionAttributeValues=values,
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        return True

    def lane(self, lane: Priority) -> LaneState:
        item: dict[str, Any] = (
            self._table.get_item(Key={"pk": KEY_PREFIX + lane.value}).get("Item") or {}
        )
        gap = item.get("gap_seconds")
        return LaneState(
            left=int(item.get("left", 0)), gap_seconds=None if gap is None else float(gap)
        )

    def position(self, task: Task, state: LaneState | None = None) -> int | None:
        """Tasks ahead of this one; None unless it is QUEUED, has a ticket and never ran."""
        if task.status is not TaskStatus.QUEUED or task.ticket is None or task.attempt:
            return None
        state = state or self.lane(task.priority)
        return max(0, task.ticket - state.left - 1)


def departure_time(updated_at: str) -> float | None:
    """A task row's `updated_at` as epoch seconds (when it left the waiting line)."""
    try:
        return datetime.fromisoformat(updated_at).timestamp()
    except ValueError:
        return None


def estimate(
    position: int,
    fleet: Fleet,
    *,
    now: float,
    max_age_seconds: float,
    gap_seconds: float | None = None,
) -> QueueEstimate:
    """The ETA of a task with `position` tasks ahead of it: the lane's measured gap between
    departures when there is one, else the fleet's rate; plus one call of its own. Never
    sooner than the fleet's rate allows: with several slots departures come in bunches, and
    a gap average caught between two of a bunch would promise a drain faster than the GPUs
    can serve."""
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
    at_fleet_rate = position / sum(rates)
    wait = at_fleet_rate if gap_seconds is None else max(position * gap_seconds, at_fleet_rate)
    return QueueEstimate(queue_position=position, eta_seconds=round(wait + own_call, 1))
