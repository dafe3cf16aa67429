"""The endpoints table's leases on their own (one table from template.yaml, no stack): slot
leases taken, renewed and released by conditional writes, the call-time EWMA they carry,
the high-priority lane's seats and waiter rows, and the one read that returns them all.

Fast on purpose: `make mutate` runs these against every mutant of the lease parts of
endpoint_registry.py (docs/mutation.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gpuqueue.fleet.endpoint_registry import EWMA_ALPHA, EndpointRegistry, Fleet, _ewma
from gpuqueue.models import Endpoint, TaskKind

NOW = 1_900_000_000.0


@pytest.fixture
def registry(template_table: Callable[[str], Any]) -> EndpointRegistry:
    registry = EndpointRegistry(template_table("EndpointsTable"))
    registry.put(
        Endpoint(endpoint_id="gpu-a", url="http://gpu-a:8000", kind=TaskKind.IMAGE, capacity=2)
    )
    return registry


def _gpu_a(registry: EndpointRegistry) -> Endpoint:
    [endpoint] = registry.fleet(TaskKind.IMAGE).endpoints
    return endpoint


def _fleet(registry: EndpointRegistry) -> Fleet:
    return registry.fleet(TaskKind.IMAGE)


def test_a_free_slot_is_leased_once_until_its_lease_ends(registry: EndpointRegistry) -> None:
    gpu = _gpu_a(registry)

    lease = registry.take_slot(gpu, 0, task_id="t1", lease_seconds=30, now=NOW)

    assert lease is not None
    assert (lease.endpoint_id, lease.slot, lease.task_id) == ("gpu-a", 0, "t1")
    assert (lease.lease_until, lease.leased_at, lease.call_seconds_ewma) == (NOW + 30, NOW, None)
    assert registry.take_slot(gpu, 0, task_id="t2", lease_seconds=30, now=NOW + 29.999) is None
    # At its end exactly, the lease is over (as SlotLease.is_live says).
    after = registry.take_slot(gpu, 0, task_id="t3", lease_seconds=30, now=NOW + 30)
    assert after is not None
    assert after.lease_id != lease.lease_id
    [live] = _fleet(registry).live_leases("gpu-a", NOW + 31)
    assert (live.task_id, live.lease_id, live.lease_until) == ("t3", after.lease_id, NOW + 60)


def test_a_release_frees_the_slot_only_for_the_lease_that_holds_it(
    registry: EndpointRegistry,
) -> None:
    gpu = _gpu_a(registry)
    stale = registry.take_slot(gpu, 0, task_id="t1", lease_seconds=1, now=NOW)
    current = registry.take_slot(gpu, 0, task_id="t2", lease_seconds=30, now=NOW + 2)
    assert stale is not None
    assert current is not None

    registry.release_slot(stale, call_seconds=9.0)  # its lease was taken over: no effect
    assert [lease.task_id for lease in _fleet(registry).live_leases("gpu-a", NOW + 3)] == ["t2"]
    assert _fleet(registry).call_seconds == {}

    registry.release_slot(current)
    assert _fleet(registry).live_leases("gpu-a", NOW + 3) == []
    assert registry.take_slot(gpu, 0, task_id="t3", lease_seconds=30, now=NOW + 3) is not None


def test_the_call_time_ewma_starts_at_the_first_call_and_weighs_each_next_one(
    registry: EndpointRegistry,
) -> None:
    gpu = _gpu_a(registry)
    first = registry.take_slot(gpu, 1, task_id="t1", lease_seconds=30, now=NOW)
    assert first is not None
    registry.release_slot(first, call_seconds=4.0)
    assert _fleet(registry).call_seconds == {"gpu-a": {1: 4.0}}

    second = registry.take_slot(gpu, 1, task_id="t2", lease_seconds=30, now=NOW + 5)
    assert second is not None
    assert second.call_seconds_ewma == 4.0  # what the slot had measured, handed to the lease
    registry.release_slot(second, call_seconds=8.0)
    expected = round(EWMA_ALPHA * 8.0 + (1 - EWMA_ALPHA) * 4.0, 3)
    assert _fleet(registry).call_seconds == {"gpu-a": {1: expected}}

    third = registry.take_slot(gpu, 1, task_id="t3", lease_seconds=30, now=NOW + 10)
    assert third is not None
    registry.release_slot(third)  # a failed call: no sample
    assert _fleet(registry).call_seconds == {"gpu-a": {1: expected}}


def test_a_held_slot_is_renewed_for_the_next_task_only_while_its_lease_is_ours_and_live(
    registry: EndpointRegistry,
) -> None:
    gpu = _gpu_a(registry)
    lease = registry.take_slot(gpu, 0, task_id="t1", lease_seconds=30, now=NOW)
    assert lease is not None

    renewed = registry.renew_slot(
        lease, task_id="t2", lease_seconds=20, now=NOW + 12, call_seconds=12.0
    )

    assert renewed is not None
    assert (renewed.lease_id, renewed.task_id) == (lease.lease_id, "t2")
    assert (renewed.lease_until, renewed.leased_at, renewed.call_seconds_ewma) == (
        NOW + 32,
        NOW + 12,
        12.0,
    )
    [live] = _fleet(registry).live_leases("gpu-a", NOW + 13)
    assert (live.task_id, live.lease_until, live.leased_at) == ("t2", NOW + 32, NOW + 12)
    assert _fleet(registry).call_seconds == {"gpu-a": {0: 12.0}}
    # Renewed again with another call's time: folded into the EWMA, as a release does.
    again = registry.renew_slot(
        renewed, task_id="t3", lease_seconds=20, now=NOW + 20, call_seconds=6.0
    )
    assert again is not None
    assert again.call_seconds_ewma == round(EWMA_ALPHA * 6.0 + (1 - EWMA_ALPHA) * 12.0, 3)

    # A lease that ended is not renewed (another worker may have the slot by now)...
    assert registry.renew_slot(again, task_id="t4", lease_seconds=20, now=NOW + 40) is None
    # ...nor one that is not ours.
    other = registry.take_slot(gpu, 0, task_id="t5", lease_seconds=30, now=NOW + 41)
    assert other is not None
    assert registry.renew_slot(again, task_id="t6", lease_seconds=20, now=NOW + 42) is None
    [live] = _fleet(registry).live_leases("gpu-a", NOW + 42)
    assert live.task_id == "t5"


def test_a_renewed_slot_reads_as_kept_until_it_is_taken_afresh_and_its_lease_only_shortens(
    registry: EndpointRegistry,
) -> None:
    gpu = _gpu_a(registry)
    lease = registry.take_slot(gpu, 0, task_id="t1", lease_seconds=30, now=NOW)
    assert lease is not None
    assert not lease.kept
    renewed = registry.renew_slot(lease, task_id="t2", lease_seconds=90, now=NOW + 4)
    assert renewed is not None
    [live] = _fleet(registry).live_leases("gpu-a", NOW + 5)
    assert live.kept

    # A timed-out call's kept lease is cut to the margin, never lengthened.
    assert registry.cut_lease(renewed, until=NOW + 20)
    assert not registry.cut_lease(renewed, until=NOW + 50)
    [live] = _fleet(registry).live_leases("gpu-a", NOW + 5)
    assert live.lease_until == NOW + 20

    # Released, then taken afresh: one call's lease again, not kept.
    registry.release_slot(renewed)
    fresh = registry.take_slot(gpu, 0, task_id="t3", lease_seconds=30, now=NOW + 21)
    assert fresh is not None
    [live] = _fleet(registry).live_leases("gpu-a", NOW + 22)
    assert not live.kept
    # A lapsed kept lease taken by another holder is not kept either.
    again = registry.renew_slot(fresh, task_id="t4", lease_seconds=5, now=NOW + 22)
    assert again is not None
    other = registry.take_slot(gpu, 0, task_id="t5", lease_seconds=30, now=NOW + 28)
    assert other is not None
    [live] = _fleet(registry).live_leases("gpu-a", NOW + 29)
    assert (live.task_id, live.kept) == ("t5", False)


def test_a_never_measured_slot_renewed_without_a_call_time_stays_unmeasured(
    registry: EndpointRegistry,
) -> None:
    gpu = _gpu_a(registry)
    lease = registry.take_slot(gpu, 0, task_id="t1", lease_seconds=30, now=NOW)
    assert lease is not None

    renewed = registry.renew_slot(lease, task_id="t2", lease_seconds=20, now=NOW + 1)

    assert renewed is not None
    assert renewed.call_seconds_ewma is None
    assert _fleet(registry).call_seconds == {}


@pytest.mark.parametrize("consistent", [False, True], ids=["index", "base-table"])
def test_the_fleet_read_returns_the_lanes_seats_and_waiters_beside_the_slots(
    registry: EndpointRegistry, consistent: bool
) -> None:
    gpu = _gpu_a(registry)
    assert registry.take_slot(gpu, 1, task_id="t1", lease_seconds=30, now=NOW) is not None
    seat = registry.take_priority_seat(
        TaskKind.IMAGE, 0, task_id="vip-1", lease_seconds=30, now=NOW
    )
    assert seat is not None
    assert (
        registry.take_priority_seat(TaskKind.IMAGE, 0, task_id="vip-2", lease_seconds=30, now=NOW)
        is None
    )
    registry.wait_with_priority(TaskKind.IMAGE, "vip-2", until=NOW + 3)
    # Another kind's rows are not this kind's.
    registry.wait_with_priority(TaskKind.SPEECH, "vip-3", until=NOW + 3)
    registry.put(
        Endpoint(endpoint_id="asr-a", url="http://asr-a:8000", kind=TaskKind.SPEECH, capacity=1)
    )

    fleet = registry.fleet(TaskKind.IMAGE, consistent=consistent)

    assert [e.endpoint_id for e in fleet.endpoints] == ["gpu-a"]
    assert [(lease.slot, lease.task_id) for lease in fleet.live_leases("gpu-a", NOW)] == [(1, "t1")]
    assert fleet.free_slots(gpu, NOW) == [0]
    assert fleet.priority_waiters == {"vip-2": NOW + 3}
    assert fleet.waiting_priority(NOW) == 1
    assert [(s.slot, s.task_id, s.lease_until) for s in fleet.priority_seats] == [
        (0, "vip-1", NOW + 30)
    ]
    assert fleet.free_priority_seats(NOW, 2) == [1]

    registry.stop_waiting(TaskKind.IMAGE, "vip-2")
    registry.release_slot(seat)
    fleet = registry.fleet(TaskKind.IMAGE, consistent=consistent)
    assert fleet.priority_waiters == {}
    assert fleet.free_priority_seats(NOW, 2) == [0, 1]


class PagedTable:
    """A table whose query or scan answers in two pages (DynamoDB pages at 1 MB)."""

    def __init__(self, pages: list[dict[str, Any]]) -> None:
        self._pages = pages
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def _page(self, how: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.asked.append((how, kwargs))
        return self._pages[len(self.asked) - 1]

    def query(self, **kwargs: Any) -> dict[str, Any]:
        return self._page("query", kwargs)

    def scan(self, **kwargs: Any) -> dict[str, Any]:
        return self._page("scan", kwargs)


@pytest.mark.parametrize("consistent", [False, True], ids=["index", "base-table"])
def test_the_fleet_read_follows_every_page(consistent: bool) -> None:
    row = {"url": "http://x", "kind": "image", "row_type": "endpoint"}
    table = PagedTable(
        [
            {
                "Items": [row | {"endpoint_id": "gpu-a"}],
                "LastEvaluatedKey": {"endpoint_id": "gpu-a"},
            },
            {"Items": [row | {"endpoint_id": "gpu-b"}]},
        ]
    )

    registry = EndpointRegistry(table)  # type: ignore[arg-type]
    fleet = registry.fleet(TaskKind.IMAGE, consistent=consistent)

    assert [e.endpoint_id for e in fleet.endpoints] == ["gpu-a", "gpu-b"]
    assert table.asked[1][1]["ExclusiveStartKey"] == {"endpoint_id": "gpu-a"}
    assert "ExclusiveStartKey" not in table.asked[0][1]
    if consistent:
        # The base table, strongly consistent (the index can only be read eventually so).
        assert [how for how, _ in table.asked] == ["scan", "scan"]
        assert all(kw["ConsistentRead"] is True and "IndexName" not in kw for _, kw in table.asked)
    else:
        assert [kw["IndexName"] for _, kw in table.asked] == ["by-kind", "by-kind"]


def test_lease_times_are_kept_to_the_millisecond(registry: EndpointRegistry) -> None:
    lease = registry.take_slot(_gpu_a(registry), 0, task_id="t", lease_seconds=30, now=NOW + 0.0004)

    assert lease is not None
    assert (lease.leased_at, lease.lease_until) == (NOW, NOW + 30)


def test_a_call_four_times_off_the_slots_average_restarts_it() -> None:
    # Another model or GPU behind the same endpoint: its first call's time stands, or the
    # tail rule and the early receive would go by the old speed for several calls.
    assert _ewma(0.05, 6.0) == 6.0  # a zero-latency stand-in, then a 6 s GPU
    assert _ewma(12.0, 2.0) == 2.0
    assert _ewma(4.0, 16.0) == EWMA_ALPHA * 16.0 + (1 - EWMA_ALPHA) * 4.0  # 4x: still noise
    assert _ewma(4.0, 1.0) == EWMA_ALPHA * 1.0 + (1 - EWMA_ALPHA) * 4.0
    assert _ewma(None, 3.0) == 3.0
    assert _ewma(3.0, None) == 3.0
