"""Webhook redelivery on the owner's request, bounded so the service cannot be turned into a
traffic source aimed at a chosen URL, nor fill the webhook function's concurrency.

Three bounds, checked in this order:
- Coalescing: while a delivery of the task is still being retried (its last attempt failed,
  it has not given up, and that attempt is recent), a redelivery answers with that delivery
  instead of queueing another: the receiver gets one retrying delivery, not one per call.
- Per task: a few at once (a receiver fixed after an outage), then one a minute.
- Per user: `per_user_per_hour` in any hour, across all their tasks.
Each is a GCRA bucket in the limits table (RateLimiter, its own row type: LimitsRow). A call refused
per task spends no token of the user's; the limits table unreachable refuses (503): an
unbounded redelivery is what this module exists to prevent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from gpuqueue.errors import RateLimited, ServiceUnavailable, StoreError, TaskStateConflict
from gpuqueue.intake.rate_limiter import RateDecision, RateLimiter
from gpuqueue.models import Task, WebhookEvent, utc_now
from gpuqueue.notify.webhook_messages import DeliveryMessage, MessageSender, new_delivery
from gpuqueue.notify.webhook_retry_schedule import RETRY_CAP_SECONDS
from gpuqueue.store.limits_rows import LimitsRow

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

# Per task: 3 at once, then one a minute. A receiver owner retrying by hand needs no more,
# and together with coalescing one task can never keep more than a few deliveries going.
PER_TASK_BURST = 3
PER_TASK_INTERVAL_SECONDS = 60.0
DEFAULT_PER_USER_PER_HOUR = 20
# A failed attempt is retried within RETRY_CAP_SECONDS (jitter only shortens it); a delivery
# with no attempt for twice that is lost (its message gone), not retrying: no coalescing on it.
PENDING_FOR = timedelta(seconds=2 * RETRY_CAP_SECONDS)
UNAVAILABLE_RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class Redelivery:
    task_id: str
    delivery_id: str
    event: WebhookEvent
    coalesced: bool  # True: the delivery already retrying, nothing new queued


def retrying_delivery(task: Task, *, now: datetime) -> str | None:
    """The id of a delivery of this task that is still being retried, if any: its last
    attempt failed, did not give up, and is recent enough for another to follow."""
    last: dict[str, tuple[bool, datetime]] = {}
    for attempt in task.deliveries:
        finished = attempt.ok or bool(attempt.gave_up)
        last[attempt.delivery_id] = (finished, datetime.fromisoformat(attempt.at))
    pending = [
        (at, d) for d, (finished, at) in last.items() if not finished and now - at < PENDING_FOR
    ]
    return max(pending)[1] if pending else None


class Redeliveries:
    def __init__(
        self,
        *,
        sender: MessageSender,
        per_task: RateLimiter,
        per_user: RateLimiter,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._sender = sender
        self._per_task = per_task
        self._per_user = per_user
        self._now = now

    @classmethod
    def on_table(
        cls, sender: MessageSender, limits: Table, *, per_user_per_hour: int
    ) -> Redeliveries:
        return cls(
            sender=sender,
            per_task=RateLimiter(
                limits,
                rate_per_second=1.0 / PER_TASK_INTERVAL_SECONDS,
                burst=PER_TASK_BURST,
                rows=LimitsRow.REDELIVER_TASK,
            ),
            per_user=RateLimiter(
                limits,
                rate_per_second=per_user_per_hour / 3600.0,
                burst=per_user_per_hour,
                rows=LimitsRow.REDELIVER_USER,
            ),
        )

    def request(self, task: Task) -> Redelivery:
        """Queue the task's final event again (a new delivery id), or answer with the one
        still retrying; TaskStateConflict if there is nothing to redeliver, RateLimited past
        the task's or the owner's limit."""
        if task.webhook_url is None:
            raise TaskStateConflict(f"task {task.task_id} has no webhook_url", field="task_id")
        if not task.status.is_terminal:
            raise TaskStateConflict(
                f"task {task.task_id} is {task.status.value}; webhooks are sent for final states",
                field="task_id",
            )
        event = WebhookEvent.for_status(task.status)
        retrying = retrying_delivery(task, now=self._now())
        if retrying is not None:
            return Redelivery(task.task_id, retrying, event, coalesced=True)
        self._take(self._per_task, task.task_id, "this task", field="task_id")
        self._take(self._per_user, task.user_id, "your tasks", field=None)
        message: DeliveryMessage = new_delivery(task)
        self._sender.send(message)
        return Redelivery(task.task_id, message.delivery_id, event, coalesced=False)

    def _take(self, limiter: RateLimiter, key: str, scope: str, *, field: str | None) -> None:
        try:
            decision = limiter.take(key)
        except StoreError as error:
            raise ServiceUnavailable(
                "the limits store is unavailable; no redelivery was queued",
                retry_after_seconds=UNAVAILABLE_RETRY_AFTER_SECONDS,
            ) from error
        if decision.allowed:
            return
        refused = RateLimited(
            f"redelivery limit: at most {decision.limit} redeliveries of {scope} in a burst, "
            f"then one every {1 / limiter.rate_per_second:g} s; retry in "
            f"{decision.retry_after_seconds} s",
            retry_after_seconds=decision.retry_after_seconds,
            headers=_headers(decision),
        )
        refused.field = field
        raise refused


def _headers(decision: RateDecision) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_seconds),
    }
