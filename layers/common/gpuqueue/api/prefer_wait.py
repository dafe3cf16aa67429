"""`Prefer: wait=N` (RFC 7240): block up to N seconds (at most 25, inside API Gateway's 30 s)
for the task to reach a final state, then answer as usual.

For clients that would rather hold one request open briefly than poll. The wait polls the
task row with a growing interval (0.1 s to 0.5 s: about 55 reads for 25 s), so its cost is
the Lambda's duration plus a few cheap reads; the answer is the same shape either way.

Bounded (a held request holds a Lambda, and enough of them would take the account's
concurrency from every function):
- only a task that can finish soon is waited on: one AWAITING_UPLOAD waits for its client's
  upload (up to the URL's 15 min), so it is answered at once, as if no wait was asked;
- a wait holds one of the stack's PreferWaitSeats: seat rows `wait-seat#<i>` in the limits
  table, taken by a conditional write (free, or its lease over) and given back after. The
  lease is the wait's budget plus a margin, so a Lambda killed mid-wait leaves its seat for
  at most that long. No seat among those probed: answered at once, no Preference-Applied.
  Cost: 2 writes a waited request (beside the ~55 reads of a 25 s wait).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from gpuqueue.models import Task, TaskStatus
from gpuqueue.store.dynamodb_conditions import is_conditional_failure
from gpuqueue.store.limits_rows import LimitsRow

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

MAX_WAIT_SECONDS = 25
# What the invocation keeps for itself after the wait (shaping and returning the answer).
RESERVE_SECONDS = 2.0
FIRST_POLL_SECONDS = 0.1
MAX_POLL_SECONDS = 0.5
# Seats tried per wait (from a random one on): all of a small pool; a few of a large one.
SEAT_PROBES = 4
# A seat's lease outlasts its wait by this much (the answer, clock skew between Lambdas).
LEASE_MARGIN_SECONDS = 5.0
# Statuses that wait on something other than the GPUs (the client's upload): never soon.
NOT_SOON = frozenset({TaskStatus.AWAITING_UPLOAD})


def requested_wait(prefer: str | None) -> int | None:
    """The `wait` preference in whole seconds (capped at 25), or None. Preferences the
    server does not understand are ignored, as RFC 7240 asks."""
    if not prefer:
        return None
    for preference in prefer.split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = int(value.strip().strip('"'))
        except ValueError:
            return None
        return min(seconds, MAX_WAIT_SECONDS) if seconds > 0 else None
    return None


def wait_until_final(
    read: Callable[[], Task],
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    first: Task | None = None,
) -> Task:
    """Read the task until it is final or `seconds` have passed; the last read (`first`:
    one just read)."""
    deadline = clock() + seconds
    interval = FIRST_POLL_SECONDS
    task = first if first is not None else read()
    while not task.status.is_terminal:
        left = deadline - clock()
        if left <= 0:
            return task
        sleep(min(interval, left))
        interval = min(MAX_POLL_SECONDS, interval * 1.5)
        task = read()
    return task


def wait_budget(requested: int, remaining_seconds: float) -> float:
    """What the wait may take: the request's N, within what is left of the invocation."""
    return max(0.0, min(float(requested), remaining_seconds - RESERVE_SECONDS))


def can_finish_soon(task: Task) -> bool:
    """Worth holding a request for: the task waits on the GPUs, not on its client."""
    return task.status not in NOT_SOON


@dataclass(frozen=True)
class Seat:
    key: str
    holder: str


class WaitSeats:
    """At most `seats` waits at once across the stack, each seat a row with a lease."""

    def __init__(
        self,
        table: Table,
        *,
        seats: int,
        clock: Callable[[], float] = time.time,
        pick: Callable[[int], int] = random.randrange,
    ) -> None:
        self._table = table
        self.seats = seats
        self._clock = clock
        self._pick = pick

    def take(self, lease_seconds: float) -> Seat | None:
        """A free seat (or one whose lease is over: its waiter died) for `lease_seconds`;
        None when the probed seats are all held."""
        if self.seats < 1:
            return None
        first = self._pick(self.seats)
        holder = uuid.uuid4().hex
        now = self._clock()
        for offset in range(min(SEAT_PROBES, self.seats)):
            key = LimitsRow.WAIT_SEAT.key(str((first + offset) % self.seats))
            try:
                self._table.update_item(
                    Key={"pk": key},
                    UpdateExpression="SET holder = :holder, lease_until = :until",
                    ConditionExpression="attribute_not_exists(lease_until) OR lease_until < :now",
                    ExpressionAttributeValues={
                        ":holder": holder,
                        ":until": _seconds(now + lease_seconds),
                        ":now": _seconds(now),
                    },
                )
            except ClientError as error:
                if is_conditional_failure(error):
                    continue
                raise
            return Seat(key, holder)
        return None

    def release(self, seat: Seat) -> None:
        """Give the seat back, unless its lease ran out and another waiter has it."""
        try:
            self._table.update_item(
                Key={"pk": seat.key},
                UpdateExpression="REMOVE holder, lease_until",
                ConditionExpression="holder = :holder",
                ExpressionAttributeValues={":holder": seat.holder},
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise


@dataclass(frozen=True)
class WaitOutcome:
    task: Task
    applied: bool  # the wait was honoured: the answer carries Preference-Applied


def wait_if_worthwhile(
    read: Callable[[], Task],
    *,
    requested: int,
    remaining_seconds: float,
    seats: WaitSeats | None,
) -> WaitOutcome:
    """Prefer: wait as the routes honour it: a final task at once; one that cannot finish
    soon, or no free seat, at once and not applied; else under a seat until final or the
    budget is spent."""
    task = read()
    if task.status.is_terminal:
        return WaitOutcome(task, applied=True)
    if not can_finish_soon(task):
        return WaitOutcome(task, applied=False)
    budget = wait_budget(requested, remaining_seconds)
    seat = None
    if seats is not None:
        seat = seats.take(budget + LEASE_MARGIN_SECONDS)
        if seat is None:
            return WaitOutcome(task, applied=False)
    try:
        return WaitOutcome(wait_until_final(read, budget, first=task), applied=True)
    finally:
        if seats is not None and seat is not None:
            seats.release(seat)


PREFERENCE_APPLIED_HEADER = "Preference-Applied"


@dataclass(frozen=True)
class WaitAnswer:
    task: Task  # the last read
    headers: dict[str, str]  # Preference-Applied when the wait was honoured, else none


def honour_prefer_wait(
    prefer: str | None,
    read: Callable[[], Task],
    *,
    remaining_seconds: Callable[[], float],
    seats: WaitSeats | None,
) -> WaitAnswer | None:
    """A request's `Prefer` header as every route that honours it answers it: None when it
    asks no wait (nothing is read); else the task after the wait, with the headers to add."""
    wait = requested_wait(prefer)
    if wait is None:
        return None
    waited = wait_if_worthwhile(
        read, requested=wait, remaining_seconds=remaining_seconds(), seats=seats
    )
    headers = {PREFERENCE_APPLIED_HEADER: f"wait={wait}"} if waited.applied else {}
    return WaitAnswer(waited.task, headers)


def _seconds(at: float) -> Decimal:
    return Decimal(str(round(at, 3)))
