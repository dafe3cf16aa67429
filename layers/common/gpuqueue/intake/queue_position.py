"""Queue position and ETA of a waiting task, in O(1) per status request.

Each lane keeps three counters in the limits table (row `lane#<priority>`):
- `issued`: a ticket number taken by every task when it is queued (one atomic ADD);
- `left`: how many of them have left the waiting line (started for the first time, or ended
  before starting: canceled, expired, failed). The tasks table's stream counts them
  (TaskEventsFunction), so no code path that moves a task can forget to; one write per
  lane per stream batch, however many left in it;
- `waiting`: issued minus left, kept beside them so that the ticket's write can carry the
  lane's capacity as its condition (QueueCapacity: an exact bound, never overshot).

A task's position is the number of tasks queued before it that are still waiting:
`ticket - left - 1`, at least 0. It is exact when tasks start in the order they were queued;
SQS (standard) delivers roughly in that order, and a task leaving out of order (a cancel)
makes the estimate low by one for those queued before it. The stream runs ~0.25 s behind.

ETA: the lane's measured departure rate - the mean of the last 32 gaps between tasks leaving
its waiting line (`gap_seconds`, kept with the counters and the gaps, `recent_gaps`; a gap
after a departure that left the line empty, or over 2 minutes, measures idleness, not
service, and is left out) - times the position, plus one call of the task's own
(the fleet's measured call time). Before any gap is measured, the fleet's rate stands in:
its healthy endpoints finish `sum(capacity / call seconds)` tasks a second. Measuring
departures includes what call times miss: the work around each call, retries, the other
lane's share of the slots. Still an estimate: new endpoints or a burst of retries move it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from gpuqueue.fleet.endpoint_registry import Fleet
from gpuqueue.models import Priority, Task, TaskStatus
from gpuqueue.store.dynamodb_conditions import is_conditional_failure, refused_item
from gpuqueue.store.limits_rows import LimitsRow
from gpuqueue.store.sdk_errors import raises_store_error

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

GAP_WINDOW = 32  # gaps the lane's gap is the mean of: several bunches of a large fleet
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


class LaneFull(Exception):
    """The lane's waiting line is at its capacity."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} tasks waiting")
        self.waiting = waiting


def _number(value: Any) -> int:
    return int(value) if value is not None else 0


class QueuePositions:
    def __init__(self, table: Table) -> None:
        self._table = table

    @raises_store_error("limits table")
    def take_ticket(self, lane: Priority, *, capacity: int | None = None) -> int:
        """A ticket in the lane's waiting line; with `capacity`, only while fewer than that
        many tasks wait (LaneFull otherwise). Count and bound are one conditional write, so
        concurrent submits can never overshoot it (a depth read, then a send, could)."""
        request: dict[str, Any] = {
            "Key": {"pk": LimitsRow.LANE.key(lane.value)},
            "UpdateExpression": "ADD issued :one, waiting :one",
            "ExpressionAttributeValues": {":one": 1},
            "ReturnValues": "UPDATED_NEW",
        }
        if capacity is not None:
            request["ConditionExpression"] = "attribute_not_exists(waiting) OR waiting < :cap"
            request["ExpressionAttributeValues"][":cap"] = capacity
            request["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        try:
            answer = self._table.update_item(**request)
        except ClientError as error:
            if is_conditional_failure(error):
                old = refused_item(error) or {}
                raise LaneFull(_number(old.get("waiting"))) from error
            raise
        return int(answer["Attributes"]["issued"])  # type: ignore[arg-type]

    def waiting(self, lane: Priority) -> int:
        """How many tasks wait in the lane's line (queued, never started)."""
        item = self._table.get_item(
            Key={"pk": LimitsRow.LANE.key(lane.value)}, ConsistentRead=True
        ).get("Item")
        return _number((item or {}).get("waiting"))

    @raises_store_error("limits table")
    def left(self, lane: Priority, *, at: float | None = None) -> None:
        """One queued task stopped waiting at `at` (epoch seconds; None: a ticket never used,
        which counts without timing anything)."""
        self.left_many(lane, [at])

    def left_many(self, lane: Priority, times: Sequence[float | None]) -> None:
        """Several tasks stopped waiting (a stream batch's departures): one read and one
        write for all of them, their gaps added to the window in time order."""
        if not times:
            return
        key = {"pk": LimitsRow.LANE.key(lane.value)}
        timed = sorted(at for at in times if at is not None)
        if timed:
            for _ in range(GAP_ROUNDS):
                if self._left_timed(key, len(times), timed):
                    return
        self._count_left(key, len(times))

    def _count_left(self, key: dict[str, str], count: int) -> None:
        self._table.update_item(
            Key=key,
            UpdateExpression="ADD #left :n, waiting :minus",
            ExpressionAttributeNames={"#left": "left"},
            ExpressionAttributeValues={":n": count, ":minus": -count},
        )

    def _left_timed(self, key: dict[str, str], count: int, timed: list[float]) -> bool:
        """Count the departures and add their gaps to the window, if nobody wrote meanwhile."""
        item: dict[str, Any] = self._table.get_item(Key=key, ConsistentRead=True).get("Item") or {}
        last = item.get("last_left_at")
        latest = None if last is None else float(last)
        gaps = [float(gap) for gap in item.get("recent_gaps") or []]
        emptied = bool(item.get("emptied", False))
        old_gap = item.get("gap_seconds")
        # Did a departure empty the line? Then the next gap includes idle time.
        waiting = _number(item.get("issued")) - _number(item.get("left"))
        moved = False
        for at in timed:
            if latest is not None:
                between = at - latest
                if between < 0:
                    continue  # older than the last recorded (another shard's): counted only
                if between <= MAX_GAP_SECONDS and not emptied:
                    gaps = [*gaps, between][-GAP_WINDOW:]
            waiting -= 1
            latest, emptied, moved = at, waiting <= 0, True
        if not moved:
            self._count_left(key, count)
            return True
        assert latest is not None  # moved: at least one departure was timed
        sets = ["last_left_at = :at", "emptied = :emptied", "recent_gaps = :gaps"]
        values: dict[str, Any] = {
            ":n": count,
            ":minus": -count,
            ":at": _seconds(latest),
            ":emptied": emptied,
            ":gaps": [_seconds(gap) for gap in gaps],
        }
        gap = mean_gap(gaps)
        if gap is not None and gap != (None if old_gap is None else float(old_gap)):
            sets.append("gap_seconds = :gap")
            values[":gap"] = Decimal(str(round(gap, 4)))
        if last is not None:
            values[":last"] = last
            condition = "last_left_at = :last"
        else:
            condition = "attribute_not_exists(last_left_at)"
        try:
            self._table.update_item(
                Key=key,
                UpdateExpression="SET " + ", ".join(sets) + " ADD #left :n, waiting :minus",
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
            self._table.get_item(Key={"pk": LimitsRow.LANE.key(lane.value)}).get("Item") or {}
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


def _seconds(at: float) -> Decimal:
    return Decimal(str(round(at, 3)))


def mean_gap(gaps: Sequence[float]) -> float | None:
    """The mean of the window's gaps (None: none yet). A plain mean over many, not a moving
    average: slots that finish together leave in bunches, and an average weighted to the
    latest gaps swings with where it was read (after a bunch's short gaps it promises a
    drain faster than the fleet's)."""
    if not gaps:
        return None
    return sum(gaps) / len(gaps)


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
