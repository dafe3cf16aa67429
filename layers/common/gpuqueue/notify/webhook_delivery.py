"""Webhooks: a signed POST to the submitter's URL when their task reaches a final state.

Path: the tasks table's stream -> TaskEventsFunction (`WebhookNotifier`, a task-end listener)
-> the webhook queue -> WebhookFunction (`WebhookDeliverer`, here) -> the receiver. Nothing on
the dispatcher's hot path. Each attempt checks the URL again (`webhook_target`), signs the body
(`webhook_signing`), posts it to the addresses checked (`pinned_poster`) and is logged on the
task (`deliveries`); a failure comes back on the schedule of `webhook_retry_schedule`, the last
one is dead-lettered.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from gpuqueue.errors import InvalidInput
from gpuqueue.models import Task, WebhookAttempt, iso, utc_now
from gpuqueue.notify.webhook_messages import DeliveryMessage
from gpuqueue.notify.webhook_payload import payload
from gpuqueue.notify.webhook_retry_schedule import (
    MAX_ATTEMPTS,
    RETRY_BASE_SECONDS,
    RETRY_CAP_SECONDS,
    retry_delay_seconds,
)
from gpuqueue.notify.webhook_signing import SIGNATURE_HEADER, sign
from gpuqueue.notify.webhook_target import (
    Resolver,
    WebhookTarget,
    checked_webhook_target,
    resolve_host,
)

EVENT_HEADER = "X-Gpuqueue-Event"
DELIVERY_HEADER = "X-Gpuqueue-Delivery"
MAX_LOGGED_ATTEMPTS = 100  # per task: the delivery log stays small
ERROR_CHARS = 300


@dataclass(frozen=True)
class HttpAnswer:
    status_code: int | None  # None: no answer (connection error, timeout)
    error: str | None = None


class WebhookPoster(Protocol):
    def post(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> HttpAnswer: ...


class DeliveryLog(Protocol):
    def get(self, task_id: str) -> Task | None: ...

    def record_delivery(
        self, task_id: str, attempt: WebhookAttempt, *, max_entries: int
    ) -> bool: ...


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GAVE_UP = "gave_up"
    SKIPPED = "skipped"  # already delivered, or nothing to deliver


@dataclass(frozen=True)
class DeliveryResult:
    outcome: DeliveryOutcome
    delay_seconds: int = 0


class WebhookDeliverer:
    def __init__(
        self,
        *,
        tasks: DeliveryLog,
        poster: WebhookPoster,
        secrets: Callable[[], Sequence[str]],
        allow_loopback: bool = False,
        resolve: Resolver = resolve_host,
        max_attempts: int = MAX_ATTEMPTS,
        retry_base_seconds: float = RETRY_BASE_SECONDS,
        retry_cap_seconds: float = RETRY_CAP_SECONDS,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        # pragma: no mutate block (make mutate covers the signing only)
        self._tasks = tasks
        self._poster = poster
        self._secrets = secrets
        self._allow_loopback = allow_loopback
        self._resolve = resolve
        self._max_attempts = max_attempts
        self._base = retry_base_seconds
        self._cap = retry_cap_seconds
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def deliver(self, message: DeliveryMessage, *, attempt: int) -> DeliveryResult:
        """One attempt (`attempt` is 1-based: the message's receive count)."""
        # pragma: no mutate block (make mutate covers the signing only)
        task = self._tasks.get(message.task_id)
        if task is None or task.webhook_url is None:
            return DeliveryResult(DeliveryOutcome.SKIPPED)
        if any(a.ok and a.delivery_id == message.delivery_id for a in task.deliveries):
            # A repeated message for a delivery that landed.
            return DeliveryResult(DeliveryOutcome.SKIPPED)
        started = self._clock()
        answer = self._attempt(task, message, started)
        ok = answer.status_code is not None and 200 <= answer.status_code < 300
        last = not ok and attempt >= self._max_attempts
        self._tasks.record_delivery(
            task.task_id,
            WebhookAttempt(
                delivery_id=message.delivery_id,
                event=message.event,
                attempt=attempt,
                at=iso(utc_now()),
                ok=ok,
                status_code=answer.status_code,
                error=(answer.error or None) and str(answer.error)[:ERROR_CHARS],
                duration_ms=round((self._clock() - started) * 1000),
                gave_up=last,
            ),
            max_entries=MAX_LOGGED_ATTEMPTS,
        )
        if ok:
            return DeliveryResult(DeliveryOutcome.DELIVERED)
        if last:
            return DeliveryResult(DeliveryOutcome.GAVE_UP)
        delay = retry_delay_seconds(attempt, base=self._base, cap=self._cap, rng=self._rng)
        return DeliveryResult(DeliveryOutcome.RETRY, delay_seconds=delay)

    def _attempt(self, task: Task, message: DeliveryMessage, now: float) -> HttpAnswer:
        url = task.webhook_url or ""
        try:
            # Again at delivery, and the poster connects to exactly the addresses checked
            # here: the name may resolve elsewhere now, or on the next lookup (DNS rebinding).
            target = checked_webhook_target(
                url, allow_loopback=self._allow_loopback, resolve=self._resolve
            )
        except InvalidInput as refused:
            return HttpAnswer(status_code=None, error=refused.message)
        body = payload(task, message)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "gpuqueue-webhooks/1",
            SIGNATURE_HEADER: sign(list(self._secrets()), body, timestamp=int(now)),
            EVENT_HEADER: message.event.value,
            DELIVERY_HEADER: message.delivery_id,
        }
        return self._poster.post(target, body, headers)


# pragma: no mutate start (make mutate covers the signing only)
def as_log(task: Task) -> dict[str, Any]:
    """GET /api/v1/tasks/{id}/deliveries."""
    return {
        "task_id": task.task_id,
        "webhook_url": task.webhook_url,
        "webhook_events": [e.value for e in task.webhook_events] if task.webhook_events else None,
        "deliveries": [a.model_dump(mode="json", exclude_none=True) for a in task.deliveries],
    }


# pragma: no mutate end
