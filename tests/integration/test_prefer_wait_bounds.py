"""`Prefer: wait` holds a Lambda for up to 25 s, so it is bounded: never on a task that
cannot finish soon, and at most PreferWaitSeats at once (seats with a lease, so a waiter
killed mid-wait cannot keep its seat)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import boto3

from gpuqueue.store.limits_rows import LimitsRow


def _status(h, user, task_id, wait: int):
    return h.get_task(user, task_id, headers={"Prefer": f"wait={wait}"})


def _seat(h, index: int = 0) -> dict | None:
    limits = boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable"))
    return limits.get_item(
        Key={"pk": LimitsRow.WAIT_SEAT.key(str(index))}, ConsistentRead=True
    ).get("Item")


def _hold_seat(h, *, lease_until: float, index: int = 0) -> None:
    """The seat as a waiter left it (one that was killed mid-wait, say)."""
    limits = boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable"))
    limits.put_item(
        Item={
            "pk": LimitsRow.WAIT_SEAT.key(str(index)),
            "holder": "a-killed-waiter",
            "lease_until": Decimal(str(round(lease_until, 3))),
        }
    )


def test_a_speech_task_awaiting_its_upload_answers_prefer_wait_at_once(make_stack, alice):
    h = make_stack()
    started = h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/async",
        body={"filename": "long.wav", "size_bytes": 4096},
        user=alice,
    )
    assert started.status == 202, started.body
    task_id = started.json()["task_id"]
    begun = time.monotonic()

    answer = _status(h, alice, task_id, wait=25)

    assert time.monotonic() - begun < 3
    assert answer.status == 200
    assert answer.json()["status"] == "AWAITING_UPLOAD"
    assert "preference-applied" not in answer.headers
    assert _seat(h) is None  # no seat was taken for it


def test_past_the_cap_of_waiting_requests_a_waiter_answers_at_once(make_stack, alice):
    h = make_stack(parameters={"PreferWaitSeats": "1"})  # nothing dispatches: tasks stay QUEUED
    first, second = (h.submit(alice).json()["task_id"] for _ in range(2))
    answers = {}
    holder = threading.Thread(target=lambda: answers.update(first=_status(h, alice, first, 3)))
    holder.start()
    deadline = time.monotonic() + 10
    while _seat(h) is None or "holder" not in _seat(h):  # the first waiter holds the seat
        assert time.monotonic() < deadline, "the first waiter never took its seat"
        time.sleep(0.02)
    begun = time.monotonic()

    refused = _status(h, alice, second, wait=3)

    assert time.monotonic() - begun < 1.5
    assert refused.status == 200
    assert refused.json()["status"] == "QUEUED"
    assert "preference-applied" not in refused.headers
    holder.join(timeout=15)
    assert answers["first"].headers["preference-applied"] == "wait=3"
    assert "holder" not in _seat(h)  # given back when its wait ended


def test_a_seat_left_by_a_crashed_waiter_is_reusable_after_its_lease(make_stack, alice):
    h = make_stack(parameters={"PreferWaitSeats": "1"})
    task_id = h.submit(alice).json()["task_id"]
    _hold_seat(h, lease_until=time.time() + 60)
    assert "preference-applied" not in _status(h, alice, task_id, wait=1).headers

    _hold_seat(h, lease_until=time.time() - 1)  # its lease is over: the waiter is gone
    begun = time.monotonic()
    answer = _status(h, alice, task_id, wait=1)

    assert time.monotonic() - begun >= 1.0
    assert answer.headers["preference-applied"] == "wait=1"
    assert "holder" not in _seat(h)


def test_submit_with_prefer_wait_past_the_cap_answers_202_at_once(make_stack, alice):
    h = make_stack(parameters={"PreferWaitSeats": "1"})
    _hold_seat(h, lease_until=time.time() + 60)
    begun = time.monotonic()

    answer = h.call(
        "submit_handler",
        "POST",
        "/api/v1/image/async",
        body={"prompt": "a red fox"},
        user=alice,
        headers={"Prefer": "wait=3"},
    )

    assert time.monotonic() - begun < 1.5
    assert answer.status == 202
    assert "preference-applied" not in answer.headers
