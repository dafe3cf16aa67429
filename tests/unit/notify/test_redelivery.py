"""Which delivery of a task is still being retried (a redelivery then names it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gpuqueue.models import Task, TaskStatus, WebhookAttempt, WebhookEvent, iso
from gpuqueue.notify.redelivery import retrying_delivery

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _task(*attempts: tuple[str, bool, bool, timedelta]) -> Task:
    return Task(
        task_id="t-1",
        user_id="u-1",
        status=TaskStatus.DONE,
        created_at="2026-11-23T10:00:00Z",
        updated_at="2026-11-23T10:00:05Z",
        webhook_url="https://h.example.com/",
        deliveries=[
            WebhookAttempt(
                delivery_id=delivery,
                event=WebhookEvent.DONE,
                attempt=n,
                at=iso(NOW - ago),
                ok=ok,
                gave_up=gave_up,
            )
            for n, (delivery, ok, gave_up, ago) in enumerate(attempts, start=1)
        ],
    )


def test_a_delivery_whose_last_attempt_failed_recently_is_still_retrying():
    task = _task(("d-1", False, False, timedelta(minutes=3)))

    assert retrying_delivery(task, now=NOW) == "d-1"


def test_a_delivery_that_landed_or_gave_up_is_not_retrying():
    task = _task(
        ("d-1", False, False, timedelta(minutes=9)),
        ("d-1", True, False, timedelta(minutes=8)),
        ("d-2", False, True, timedelta(minutes=1)),
    )

    assert retrying_delivery(task, now=NOW) is None


def test_a_delivery_silent_for_longer_than_any_retry_wait_is_lost_not_retrying():
    # Its message is gone (no attempt for 2x the longest backoff): a redelivery must not be
    # held back by it forever.
    task = _task(("d-1", False, False, timedelta(minutes=31)))

    assert retrying_delivery(task, now=NOW) is None
