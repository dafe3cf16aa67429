"""SlotBroker's waiting: sleep until a busy call is due, then poll briskly; no blind polling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gpuqueue.endpoint_registry import Fleet
from gpuqueue.models import Endpoint, SlotLease, TaskKind
from gpuqueue.slot_broker import MAX_POLL_SECONDS, NoFreeSlot, SlotBroker, SlotRequest

NOW = 1_800_000_000.0


def endpoint(capacity: int = 1) -> Endpoint:
    return Endpoint(
        endpoint_id="gpu-a",
        url="http://gpu-a:8000",
        kind=TaskKind.IMAGE,
        capacity=capacity,
        healthy=True,
        last_checked_at=NOW - 1,
    )


def busy_since(started: float) -> Fleet:
    lease = SlotLease(
        endpoint_id="gpu-a",
        slot=0,
        lease_id="other",
        task_id="other-task",
        lease_until=NOW + 100,
        leased_at=started,
    )
    return Fleet(
        endpoints=[endpoint()], leases={"gpu-a": [lease]}, call_seconds={"gpu-a": {0: 4.0}}
    )


class FakeRegistry:
    """Serves a scripted sequence of fleet reads; takes any slot offered."""

    def __init__(self, fleets: list[Fleet]) -> None:
        self._fleets: Iterator[Fleet] = iter(fleets)

    def fleet(self, kind: TaskKind) -> Fleet:
        return next(self._fleets)

    def take_slot(self, e: Endpoint, slot: int, **kwargs: Any) -> SlotLease:
        return SlotLease(
            endpoint_id=e.endpoint_id,
            slot=slot,
            lease_id="mine",
            task_id=kwargs["task_id"],
            lease_until=NOW + 60,
        )


def broker(fleets: list[Fleet], sleeps: list[float]) -> SlotBroker:
    return SlotBroker(
        FakeRegistry(fleets),  # type: ignore[arg-type]
        health_max_age_seconds=90,
        poll_seconds=0.1,
        clock=lambda: NOW,
        sleep=sleeps.append,
    )


def request(wait: float = 5.0) -> SlotRequest:
    return SlotRequest(
        kind=TaskKind.IMAGE, task_id="t", user_id="u", lease_seconds=60, wait_seconds=wait
    )


def test_a_waiter_sleeps_until_the_busy_call_is_due_then_polls_briskly() -> None:
    sleeps: list[float] = []
    free = Fleet(endpoints=[endpoint()])
    fleets = [busy_since(NOW - 3.5), busy_since(NOW - 1.0), busy_since(NOW - 5.0), free]

    held = broker(fleets, sleeps).acquire(request())

    # Due in 0.5 s: sleep 0.5; due in 3 s: at most MAX_POLL; overdue: the poll interval.
    assert sleeps == [pytest.approx(0.5), MAX_POLL_SECONDS, 0.1]
    assert held.lease.slot == 0


def test_a_waiter_gives_up_when_its_wait_is_over() -> None:
    sleeps: list[float] = []

    with pytest.raises(NoFreeSlot):
        broker([busy_since(NOW - 1.0)], sleeps).acquire(request(wait=0))

    assert sleeps == []
