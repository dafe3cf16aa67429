"""SlotBroker's waiting: sleep until a busy call is due, then poll briskly; no blind polling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from gpuqueue.errors import StoreError
from gpuqueue.fleet.balancer import Balancer, Strategy
from gpuqueue.fleet.endpoint_registry import Fleet
from gpuqueue.fleet.slot_broker import (
    BACKLOG_TTL_SECONDS,
    LEASE_TAIL_SECONDS,
    MAX_POLL_SECONDS,
    WAITER_ROW_SECONDS,
    HeldSlot,
    NoFreeSlot,
    NoRoutableEndpoint,
    SlotBroker,
    SlotRequest,
    _Backlog,
    _PriorityWait,
)
from gpuqueue.models import CircuitState, Endpoint, EndpointState, Priority, SlotLease, TaskKind

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
        self.inconsistent_reads = 0

    def fleet(self, kind: TaskKind, *, consistent: bool = False) -> Fleet:
        self.inconsistent_reads += not consistent
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


def test_every_fleet_read_a_slot_is_chosen_from_is_strongly_consistent() -> None:
    # An eventually consistent read may not show a lease just taken (a failed take) or
    # released (a free slot missed): the broker reads the base table.
    registry = FakeRegistry([busy_since(NOW - 3.5), Fleet(endpoints=[endpoint()])])
    broker_ = SlotBroker(
        registry,  # type: ignore[arg-type]
        health_max_age_seconds=90,
        poll_seconds=0.1,
        clock=lambda: NOW,
        sleep=lambda _: None,
    )

    broker_.acquire(request())

    assert next(registry._fleets, None) is None  # both reads made
    assert registry.inconsistent_reads == 0


def test_a_waiter_gives_up_when_its_wait_is_over() -> None:
    sleeps: list[float] = []

    with pytest.raises(NoFreeSlot):
        broker([busy_since(NOW - 1.0)], sleeps).acquire(request(wait=0))

    assert sleeps == []


# --- the priority lane -------------------------------------------------------------------


class RecordingRegistry(FakeRegistry):
    """Also records the high-priority waiter rows written and removed."""

    def __init__(self, fleets: list[Fleet]) -> None:
        super().__init__(fleets)
        self.waiting: list[tuple[str, float]] = []
        self.stopped: list[str] = []

    def wait_with_priority(self, kind: TaskKind, task_id: str, *, until: float) -> None:
        self.waiting.append((task_id, until))

    def stop_waiting(self, kind: TaskKind, task_id: str) -> None:
        self.stopped.append(task_id)


def with_waiters(fleet: Fleet, *task_ids: str) -> Fleet:
    fleet.priority_waiters = dict.fromkeys(task_ids, NOW + 2)
    return fleet


def high(wait: float = 5.0) -> SlotRequest:
    return SlotRequest(
        kind=TaskKind.IMAGE,
        task_id="vip",
        user_id="u",
        lease_seconds=60,
        wait_seconds=wait,
        priority=Priority.HIGH,
    )


def test_a_normal_request_leaves_the_free_slot_to_a_waiting_high_priority_task() -> None:
    sleeps: list[float] = []
    reserved = with_waiters(Fleet(endpoints=[endpoint()]), "vip")

    with pytest.raises(NoFreeSlot):
        broker([reserved, reserved], sleeps).acquire(request(wait=0.0))


def test_a_normal_request_takes_a_slot_beyond_those_the_waiters_need() -> None:
    two_free = with_waiters(Fleet(endpoints=[endpoint(capacity=2)]), "vip")

    held = broker([two_free], []).acquire(request())

    assert held.lease.task_id == "t"


def test_a_lapsed_waiter_row_holds_nothing_back() -> None:
    lapsed = Fleet(endpoints=[endpoint()], priority_waiters={"crashed": NOW - 0.1})

    held = broker([lapsed], []).acquire(request())

    assert held.lease.task_id == "t"


def test_a_high_priority_task_announces_its_wait_and_withdraws_once_served() -> None:
    sleeps: list[float] = []
    registry = RecordingRegistry([busy_since(NOW - 3.9), Fleet(endpoints=[endpoint()])])
    slots = SlotBroker(
        registry,  # type: ignore[arg-type]
        health_max_age_seconds=90,
        poll_seconds=0.1,
        clock=lambda: NOW,
        sleep=sleeps.append,
    )

    held = slots.acquire(high())

    assert held.lease.task_id == "vip"
    assert registry.waiting == [("vip", NOW + WAITER_ROW_SECONDS)]
    assert registry.stopped == ["vip"]


def test_a_high_priority_task_served_at_once_writes_no_waiter_row() -> None:
    registry = RecordingRegistry([Fleet(endpoints=[endpoint()])])
    slots = SlotBroker(registry, health_max_age_seconds=90, clock=lambda: NOW, sleep=lambda s: None)  # type: ignore[arg-type]

    slots.acquire(high())

    assert registry.waiting == []
    assert registry.stopped == []


def test_a_high_priority_task_that_gives_up_withdraws_its_wait() -> None:
    registry = RecordingRegistry([busy_since(NOW - 1.0)] * 10)
    elapsed = [0.0]
    slots = SlotBroker(
        registry,  # type: ignore[arg-type]
        health_max_age_seconds=90,
        clock=lambda: NOW + elapsed[0],
        sleep=lambda seconds: elapsed.__setitem__(0, elapsed[0] + seconds),
    )

    with pytest.raises(NoFreeSlot):
        slots.acquire(high(wait=1.5))

    assert [task for task, _ in registry.waiting][:1] == ["vip"]
    assert registry.stopped == ["vip"]


def test_a_high_priority_task_does_not_defer_to_other_waiters() -> None:
    other_waiting = with_waiters(Fleet(endpoints=[endpoint()]), "other-vip")

    held = broker([other_waiting], []).acquire(high())

    assert held.lease.task_id == "vip"


# --- the priority lane's cap: seats --------------------------------------------------------


class SeatRegistry(RecordingRegistry):
    """Also leases the lane's seats (all free unless listed in `held_seats`) and records
    what is released."""

    def __init__(self, fleets: list[Fleet], *, slot_taken: bool = True) -> None:
        super().__init__(fleets)
        self.seats_taken: list[int] = []
        self.seat_asked_at: list[float] = []
        self.released: list[str] = []
        self._slot_taken = slot_taken

    def take_slot(self, e: Endpoint, slot: int, **kwargs: Any) -> SlotLease | None:  # type: ignore[override]
        return super().take_slot(e, slot, **kwargs) if self._slot_taken else None

    def take_priority_seat(self, kind: TaskKind, seat: int, **kwargs: Any) -> SlotLease:
        self.seats_taken.append(seat)
        self.seat_asked_at.append(kwargs["now"])
        return SlotLease(
            endpoint_id=f"{kind.value}#priority-lane",
            slot=seat,
            lease_id=f"seat-{seat}",
            task_id=kwargs["task_id"],
            lease_until=NOW + kwargs["lease_seconds"],
        )

    def release_slot(self, lease: SlotLease, *, call_seconds: float | None = None) -> None:
        self.released.append(lease.lease_id)


def seat_held_by(task_id: str, seat: int = 0) -> SlotLease:
    return SlotLease(
        endpoint_id="image#priority-lane",
        slot=seat,
        lease_id=f"{task_id}-seat",
        task_id=task_id,
        lease_until=NOW + 30,
    )


def lane_broker(registry: SeatRegistry, *, seats: int = 1, clock: list[float]) -> SlotBroker:
    return SlotBroker(
        registry,  # type: ignore[arg-type]
        health_max_age_seconds=90,
        poll_seconds=0.1,
        priority_lane_slots=seats,
        clock=lambda: clock[0],
        sleep=lambda seconds: clock.__setitem__(0, clock[0] + seconds),
    )


def test_a_high_priority_call_takes_a_seat_with_its_slot_and_gives_both_back() -> None:
    registry = SeatRegistry([Fleet(endpoints=[endpoint(capacity=2)])])

    held = lane_broker(registry, clock=[NOW]).acquire(high())
    held.release(call_seconds=4.0)

    assert registry.seats_taken == [0]
    assert held.seat is not None
    assert held.seat.lease_until == held.lease.lease_until  # a crashed call frees both at once
    assert registry.released == ["mine", "seat-0"]


def test_at_the_lanes_cap_a_high_priority_call_leaves_the_free_slot_to_normal_work() -> None:
    lane_full = Fleet(endpoints=[endpoint(capacity=2)], priority_seats=[seat_held_by("vip-1")])
    registry = SeatRegistry([lane_full] * 30)

    with pytest.raises(NoFreeSlot):
        lane_broker(registry, clock=[NOW]).acquire(high(wait=1.0))

    assert registry.seats_taken == []
    assert registry.waiting == []  # no waiter row: normal requests are not held back
    normal = broker([lane_full], []).acquire(request())
    assert normal.lease.task_id == "t"


def test_a_waiter_withdraws_its_row_once_the_lane_fills_up() -> None:
    busy = busy_since(NOW - 1.0)
    full = busy_since(NOW - 1.0)
    full.priority_seats = [seat_held_by("vip-1")]
    registry = SeatRegistry([busy, full, *([full] * 30)])

    with pytest.raises(NoFreeSlot):
        lane_broker(registry, clock=[NOW]).acquire(high(wait=2.0))

    assert [task for task, _ in registry.waiting] == ["vip"]
    assert registry.stopped == ["vip"]


def test_a_lapsed_seat_is_free_again() -> None:
    crashed = seat_held_by("crashed")
    lapsed = Fleet(endpoints=[endpoint()], priority_seats=[crashed])
    registry = SeatRegistry([lapsed])

    held = lane_broker(registry, clock=[crashed.lease_until]).acquire(high())

    assert registry.seats_taken == [0]
    assert held.lease.task_id == "vip"


def test_with_two_seats_the_lane_takes_the_one_still_free() -> None:
    one_held = Fleet(endpoints=[endpoint(capacity=3)], priority_seats=[seat_held_by("vip-1")])
    registry = SeatRegistry([one_held])

    lane_broker(registry, seats=2, clock=[NOW]).acquire(high())

    assert registry.seats_taken == [1]


def test_a_seat_taken_for_a_slot_lost_to_a_race_is_given_back() -> None:
    free = Fleet(endpoints=[endpoint()])
    registry = SeatRegistry([free], slot_taken=False)

    with pytest.raises(NoFreeSlot):
        lane_broker(registry, clock=[NOW]).acquire(high(wait=0.0))

    assert registry.seats_taken == [0]
    assert registry.released == ["seat-0"]


def test_a_call_that_may_still_run_keeps_its_seat_until_the_lease_ends() -> None:
    registry = SeatRegistry([Fleet(endpoints=[endpoint()])])

    held = lane_broker(registry, clock=[NOW]).acquire(high())
    held.keep_until_lease_ends()
    held.release()

    assert registry.released == []


def test_normal_requests_never_take_a_seat() -> None:
    registry = SeatRegistry([Fleet(endpoints=[endpoint()], priority_seats=[seat_held_by("v")])])

    held = lane_broker(registry, clock=[NOW]).acquire(request())

    assert held.seat is None
    assert registry.seats_taken == []


def test_a_lane_of_no_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SlotBroker(FakeRegistry([]), health_max_age_seconds=90, priority_lane_slots=0)  # type: ignore[arg-type]


# --- leases, retries and release ----------------------------------------------------------


class LeaseRegistry(FakeRegistry):
    """Records every slot lease asked for and every release (with the call's duration)."""

    def __init__(self, fleets: list[Fleet]) -> None:
        super().__init__(fleets)
        self.asked: list[dict[str, Any]] = []
        self.released: list[tuple[str, float | None]] = []

    def take_slot(self, e: Endpoint, slot: int, **kwargs: Any) -> SlotLease:
        self.asked.append({"endpoint_id": e.endpoint_id, "slot": slot, **kwargs})
        return super().take_slot(e, slot, **kwargs)

    def release_slot(self, lease: SlotLease, *, call_seconds: float | None = None) -> None:
        self.released.append((lease.lease_id, call_seconds))


def named(endpoint_id: str, capacity: int = 1) -> Endpoint:
    return endpoint(capacity).model_copy(
        update={"endpoint_id": endpoint_id, "url": f"http://{endpoint_id}:8000"}
    )


def busy(endpoint_id: str) -> SlotLease:
    return SlotLease(
        endpoint_id=endpoint_id,
        slot=0,
        lease_id=f"{endpoint_id}-busy",
        task_id="other-task",
        lease_until=NOW + 100,
        leased_at=NOW - 1,
    )


def lease_broker(registry: LeaseRegistry) -> SlotBroker:
    return SlotBroker(
        registry,  # type: ignore[arg-type]
        health_max_age_seconds=90,
        clock=lambda: NOW,
        sleep=lambda seconds: None,
    )


def retry(*, tried: set[str], untried_only: bool = False, wait: float = 0.0) -> SlotRequest:
    return SlotRequest(
        kind=TaskKind.IMAGE,
        task_id="t",
        user_id="u",
        lease_seconds=42,
        wait_seconds=wait,
        tried=tried,
        untried_only=untried_only,
    )


def test_the_slot_is_leased_for_the_task_for_the_requests_lease_time() -> None:
    registry = LeaseRegistry([Fleet(endpoints=[named("gpu-a", capacity=1)])])

    held = lease_broker(registry).acquire(retry(tried=set()))

    assert registry.asked == [
        {"endpoint_id": "gpu-a", "slot": 0, "task_id": "t", "lease_seconds": 42, "now": NOW}
    ]
    assert held.endpoint.endpoint_id == "gpu-a"


def test_a_retry_waits_for_an_untried_endpoint_rather_than_go_back_to_the_failed_one() -> None:
    # gpu-a failed this task and has a free slot; gpu-b (untried) is busy.
    fleet = Fleet(endpoints=[named("gpu-a"), named("gpu-b")], leases={"gpu-b": [busy("gpu-b")]})
    registry = LeaseRegistry([fleet])

    with pytest.raises(NoFreeSlot, match="every image GPU slot is busy"):
        lease_broker(registry).acquire(retry(tried={"gpu-a"}))

    assert registry.asked == []


def test_a_retry_goes_to_the_untried_endpoint() -> None:
    fleet = Fleet(endpoints=[named("gpu-a"), named("gpu-b")])
    registry = LeaseRegistry([fleet])

    held = lease_broker(registry).acquire(retry(tried={"gpu-a"}))

    assert held.endpoint.endpoint_id == "gpu-b"


def test_with_every_endpoint_tried_a_retry_may_go_back_unless_it_must_not() -> None:
    fleet = Fleet(endpoints=[named("gpu-a")])

    again = lease_broker(LeaseRegistry([fleet])).acquire(retry(tried={"gpu-a"}))
    assert again.endpoint.endpoint_id == "gpu-a"

    registry = LeaseRegistry([fleet])
    with pytest.raises(NoRoutableEndpoint, match="no other healthy image endpoint"):
        lease_broker(registry).acquire(retry(tried={"gpu-a"}, untried_only=True))
    assert registry.asked == []


def test_no_routable_endpoint_is_said_at_once() -> None:
    stale = named("gpu-a").model_copy(update={"last_checked_at": NOW - 3600})

    with pytest.raises(NoRoutableEndpoint, match="no healthy image endpoint"):
        lease_broker(LeaseRegistry([Fleet(endpoints=[stale])])).acquire(retry(tried=set()))


def test_a_held_slot_is_released_once_with_the_calls_duration() -> None:
    registry = LeaseRegistry([Fleet(endpoints=[named("gpu-a")])])
    held = lease_broker(registry).acquire(retry(tried=set()))

    held.release(call_seconds=3.5)
    held.release()  # the `finally` after an early release

    assert registry.released == [("mine", 3.5)]


class FailingReleaseRegistry:
    """A table that refuses the slot's release write (throttled), and takes the seat's."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def release_slot(self, lease: SlotLease, *, call_seconds: float | None = None) -> None:
        if lease.lease_id == "slot-lease":
            raise StoreError(
                "endpoints table",
                ClientError(
                    {
                        "Error": {
                            "Code": "ProvisionedThroughputExceededException",
                            "Message": "slow",
                        }
                    },
                    "UpdateItem",
                ),
            )
        self.released.append(lease.lease_id)


def test_a_release_whose_write_fails_leaves_the_lease_to_lapse_and_still_frees_the_seat() -> None:
    registry = FailingReleaseRegistry()
    slot = SlotLease(
        endpoint_id="gpu-a", slot=0, lease_id="slot-lease", task_id="t", lease_until=NOW + 60
    )
    seat = SlotLease(
        endpoint_id="image#priority-lane",
        slot=0,
        lease_id="seat-lease",
        task_id="t",
        lease_until=NOW + 60,
    )
    held = HeldSlot(registry, slot, named("gpu-a"), seat=seat)  # type: ignore[arg-type]

    held.release(call_seconds=12.0)  # raises nothing: the finished call's work goes on

    assert registry.released == ["seat-lease"]


# --- a held slot: keep it for the next task, or give it back ------------------------------


def _held_on(e: Endpoint, *, seat: SlotLease | None = None) -> HeldSlot:
    lease = SlotLease(
        endpoint_id=e.endpoint_id, slot=0, lease_id="mine", task_id="t", lease_until=NOW + 30
    )
    return HeldSlot(FakeRegistry([]), lease, e, seat=seat)  # type: ignore[arg-type]


def _keeper(
    fleet: Fleet, *, strategy: Strategy = Strategy.LEAST_LOADED, backlog: int = 10
) -> SlotBroker:
    return SlotBroker(
        FakeRegistry([fleet]),  # type: ignore[arg-type]
        health_max_age_seconds=90,
        balancer=Balancer(strategy),
        backlog=lambda: backlog,
        clock=lambda: NOW,
    )


def _mine(e: Endpoint) -> SlotLease:
    return SlotLease(
        endpoint_id=e.endpoint_id,
        slot=0,
        lease_id="mine",
        task_id="t",
        lease_until=NOW + 30,
        leased_at=NOW - 4,
    )


def test_a_held_slot_is_kept_on_a_routable_endpoint_with_nobody_waiting() -> None:
    e = endpoint()
    fleet = Fleet(endpoints=[e], leases={e.endpoint_id: [_mine(e)]})

    assert _keeper(fleet).worth_keeping(_held_on(e), priority=Priority.NORMAL)


@pytest.mark.parametrize(
    "change",
    [
        {"state": EndpointState.DRAINING},
        {"state": EndpointState.DISABLED},
        {"healthy": False},
        {"circuit": CircuitState.OPEN},
        {"last_checked_at": NOW - 1000},  # its health row went stale
    ],
)
def test_a_slot_on_an_endpoint_no_longer_routable_goes_back(change: dict[str, Any]) -> None:
    e = endpoint()
    fleet = Fleet(endpoints=[e.model_copy(update=change)], leases={e.endpoint_id: [_mine(e)]})

    assert not _keeper(fleet).worth_keeping(_held_on(e), priority=Priority.NORMAL)


@pytest.mark.parametrize("strategy", [Strategy.ROUND_ROBIN, Strategy.USER_HASH, Strategy.WEIGHTED])
def test_strategies_that_choose_per_task_keep_no_slot(strategy: Strategy) -> None:
    e = endpoint()
    fleet = Fleet(endpoints=[e], leases={e.endpoint_id: [_mine(e)]})

    assert not _keeper(fleet, strategy=strategy).worth_keeping(
        _held_on(e), priority=Priority.NORMAL
    )


def test_a_held_slot_goes_to_a_waiting_high_priority_task_unless_another_is_free() -> None:
    e = endpoint(capacity=2)
    waiting = {"vip": NOW + 2}
    full = Fleet(
        endpoints=[e],
        leases={
            e.endpoint_id: [_mine(e), _mine(e).model_copy(update={"slot": 1, "lease_id": "x"})]
        },
        priority_waiters=waiting,
    )
    one_free = Fleet(endpoints=[e], leases={e.endpoint_id: [_mine(e)]}, priority_waiters=waiting)

    assert not _keeper(full).worth_keeping(_held_on(e), priority=Priority.NORMAL)
    assert _keeper(one_free).worth_keeping(_held_on(e), priority=Priority.NORMAL)
    # A high-priority task's own worker does not give way to its lane.
    assert _keeper(full).worth_keeping(_held_on(e), priority=Priority.HIGH)


def test_a_slot_held_with_a_lane_seat_or_already_given_back_is_not_kept() -> None:
    e = endpoint()
    fleet = Fleet(endpoints=[e], leases={e.endpoint_id: [_mine(e)]})
    seat = SlotLease(
        endpoint_id="image#priority-lane", slot=0, lease_id="s", task_id="t", lease_until=NOW + 30
    )
    released = _held_on(e)
    released.keep_until_lease_ends()

    assert not _keeper(fleet).worth_keeping(_held_on(e, seat=seat), priority=Priority.HIGH)
    assert not _keeper(fleet).worth_keeping(released, priority=Priority.NORMAL)


def test_at_the_tail_a_slow_endpoints_slot_goes_back_when_faster_ones_clear_the_queue() -> None:
    slow = endpoint().model_copy(update={"endpoint_id": "slow", "url": "http://slow:8000"})
    fast = endpoint(capacity=2).model_copy(
        update={"endpoint_id": "fast", "url": "http://fast:8000"}
    )
    fleet = Fleet(
        endpoints=[slow, fast],
        leases={"slow": [_mine(slow)]},
        call_seconds={"slow": {0: 12.0}, "fast": {0: 4.0, 1: 4.0}},
    )

    # One task left (ours just ended): a free fast slot finishes it in 4 s, not 12.
    assert not _keeper(fleet, backlog=1).worth_keeping(_held_on(slow), priority=Priority.NORMAL)
    # A deep queue: every slot is worth its work.
    assert _keeper(fleet, backlog=50).worth_keeping(_held_on(slow), priority=Priority.NORMAL)


# --- is there room for another call? (a worker group's scout asks) -----------------------


def idle_fleet() -> Fleet:
    return Fleet(endpoints=[endpoint()], leases={}, call_seconds={})


class CountingRegistry(FakeRegistry):
    def __init__(self, fleets: list[Fleet]) -> None:
        super().__init__(fleets)
        self.reads = 0

    def fleet(self, kind: TaskKind, *, consistent: bool = False) -> Fleet:
        self.reads += 1
        return super().fleet(kind, consistent=consistent)


def test_a_recent_read_of_the_fleet_answers_whether_a_slot_is_free() -> None:
    clock = [NOW]
    registry = CountingRegistry([idle_fleet(), busy_since(NOW - 1)])
    slots = SlotBroker(
        registry,  # type: ignore[arg-type]
        health_max_age_seconds=90,
        clock=lambda: clock[0],
    )

    assert slots.free_slot_count([TaskKind.IMAGE], max_age_seconds=2.0) == 1  # read: one free
    clock[0] += 1.5
    assert slots.free_slot_count([TaskKind.IMAGE], max_age_seconds=2.0) == 1  # the same read
    assert registry.reads == 1
    clock[0] += 1.0
    assert slots.free_slot_count([TaskKind.IMAGE], max_age_seconds=2.0) == 0  # too old: read
    assert registry.reads == 2


def test_a_read_that_a_slot_was_taken_from_shows_it_taken() -> None:
    # The read acquire chose from showed the slot it took as free: going by it, a scout would
    # take a message no slot is left for. It stands, with that slot taken (no second read).
    registry = CountingRegistry([idle_fleet()])
    slots = SlotBroker(registry, health_max_age_seconds=90, clock=lambda: NOW)  # type: ignore[arg-type]
    slots.acquire(
        SlotRequest(
            kind=TaskKind.IMAGE, task_id="t-1", user_id="u", lease_seconds=60, wait_seconds=0
        )
    )

    assert slots.free_slot_count([TaskKind.IMAGE], max_age_seconds=60.0) == 0
    assert registry.reads == 1


def test_a_seat_is_leased_as_of_the_brokers_clock() -> None:
    registry = SeatRegistry([Fleet(endpoints=[endpoint(capacity=2)])])

    lane_broker(registry, clock=[NOW + 7]).acquire(high())

    assert registry.seat_asked_at == [NOW + 7]


def test_a_waiter_never_sleeps_past_the_moment_it_gives_up() -> None:
    # The busy call is due in 2 s, but the request gives up in 0.3 s: it sleeps 0.3 s, reads
    # once more, and gives up; not a whole poll (1 s) past its deadline.
    sleeps: list[float] = []
    clock = [NOW]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    slots = SlotBroker(
        FakeRegistry([busy_since(NOW - 2.0)] * 5),  # type: ignore[arg-type]
        health_max_age_seconds=90,
        poll_seconds=0.1,
        clock=lambda: clock[0],
        sleep=sleep,
    )

    with pytest.raises(NoFreeSlot):
        slots.acquire(request(wait=0.3))

    assert sleeps == [pytest.approx(0.3)]


class KindRegistry(FakeRegistry):
    """A fleet per kind (a kind it does not have is a KeyError)."""

    def __init__(self, fleets: dict[TaskKind, Fleet]) -> None:
        super().__init__([])
        self.fleets = fleets

    def fleet(self, kind: TaskKind, *, consistent: bool = False) -> Fleet:
        self.inconsistent_reads += not consistent
        return self.fleets[kind]


def test_free_slots_are_counted_over_every_kind_asked() -> None:
    speech = endpoint(capacity=1).model_copy(update={"endpoint_id": "stt", "kind": TaskKind.SPEECH})
    registry = KindRegistry(
        {
            TaskKind.IMAGE: Fleet(endpoints=[endpoint(capacity=2)]),
            TaskKind.SPEECH: Fleet(endpoints=[speech]),
        }
    )
    slots = SlotBroker(registry, health_max_age_seconds=90, clock=lambda: NOW)  # type: ignore[arg-type]

    assert slots.free_slot_count([TaskKind.IMAGE], max_age_seconds=0) == 2
    assert slots.free_slot_count([TaskKind.IMAGE, TaskKind.SPEECH], max_age_seconds=0) == 3


# --- the waiter row and the backlog count, on their own --------------------------------


class WaiterRows:
    def __init__(self) -> None:
        self.written: list[tuple[TaskKind, str, float]] = []
        self.removed: list[tuple[TaskKind, str]] = []

    def wait_with_priority(self, kind: TaskKind, task_id: str, *, until: float) -> None:
        self.written.append((kind, task_id, until))

    def stop_waiting(self, kind: TaskKind, task_id: str) -> None:
        self.removed.append((kind, task_id))


def test_a_waiter_row_is_written_once_then_renewed_only_in_the_second_half_of_its_life() -> None:
    rows = WaiterRows()
    wait = _PriorityWait(rows, high())  # type: ignore[arg-type]
    half = WAITER_ROW_SECONDS / 2

    wait.announce(NOW)
    wait.announce(NOW + 0.1)  # early in its life: nothing written
    wait.announce(NOW + half)  # exactly half its life left: still nothing
    wait.announce(NOW + half + 0.25)  # less than half left: renewed
    wait.withdraw()
    wait.withdraw()  # once only

    assert rows.written == [
        (TaskKind.IMAGE, "vip", NOW + WAITER_ROW_SECONDS),
        (TaskKind.IMAGE, "vip", NOW + half + 0.25 + WAITER_ROW_SECONDS),
    ]
    assert rows.removed == [(TaskKind.IMAGE, "vip")]


def test_a_wait_never_announced_withdraws_nothing() -> None:
    rows = WaiterRows()

    _PriorityWait(rows, high()).withdraw()  # type: ignore[arg-type]

    assert rows.removed == []


def test_the_backlog_is_read_at_most_once_per_ttl_unless_asked_fresh() -> None:
    reads: list[float] = []
    clock = [NOW]
    depth = [7]

    def source() -> int:
        reads.append(clock[0])
        return depth[0]

    backlog = _Backlog(source, lambda: clock[0])

    assert backlog.count() == 7
    depth[0] = 3
    clock[0] = NOW + BACKLOG_TTL_SECONDS - 0.5  # (times exact in binary: the bound is exact)
    assert backlog.count() == 7  # still within its TTL: the count read then
    assert backlog.count(fresh=True) == 3  # asked fresh: read now
    clock[0] = NOW + BACKLOG_TTL_SECONDS - 0.5 + BACKLOG_TTL_SECONDS  # exactly a TTL later
    depth[0] = 1
    assert backlog.count() == 1

    assert len(reads) == 3


def test_without_a_depth_source_the_backlog_is_unknown_and_zero() -> None:
    backlog = _Backlog(None, lambda: NOW)

    assert backlog.known is False
    assert backlog.count() == 0
    assert backlog.count(fresh=True) == 0


class RenewingRegistry:
    """Renews a slot lease (or has lost it), recording what each renewal carried."""

    def __init__(self, *, lost: bool = False) -> None:
        self.lost = lost
        self.renewals: list[tuple[str, float | None]] = []
        self.released: list[str] = []
        self.release_times: list[float | None] = []

    def renew_slot(self, lease: SlotLease, *, task_id: str, call_seconds: float | None, **_: Any):  # type: ignore[no-untyped-def]
        self.renewals.append((task_id, call_seconds))
        return None if self.lost else lease.model_copy(update={"task_id": task_id})

    def release_slot(self, lease: SlotLease, *, call_seconds: float | None = None) -> None:
        self.released.append(lease.lease_id)
        self.release_times.append(call_seconds)


def _held(registry: RenewingRegistry) -> HeldSlot:
    lease = SlotLease(
        endpoint_id="gpu-a", slot=0, lease_id="mine", task_id="t1", lease_until=NOW + 60
    )
    return HeldSlot(registry, lease, endpoint(), seat=None)  # type: ignore[arg-type]


def test_a_renewal_carries_the_last_calls_time_once() -> None:
    registry = RenewingRegistry()
    held = _held(registry)
    held.note_call(3.5)

    assert held.renew_for("t2", lease_seconds=60, now=NOW)
    assert held.renew_for("t3", lease_seconds=60, now=NOW)

    assert registry.renewals == [("t2", 3.5), ("t3", None)]  # folded into the EWMA once
    assert held.lease.task_id == "t3"


def test_a_kept_slot_given_back_carries_its_last_calls_time_and_expects_it_next() -> None:
    registry = RenewingRegistry()
    held = _held(registry)
    held.lease = held.lease.model_copy(update={"call_seconds_ewma": 9.0})
    assert held.expected_call_seconds == 9.0  # no call yet: the slot's average

    held.note_call(3.5)

    assert held.expected_call_seconds == 3.5  # the last call's own time
    held.release()
    assert registry.release_times == [3.5]  # folded into the EWMA as the slot goes back


def test_a_call_may_run_until_half_a_second_before_the_first_of_its_leases_ends() -> None:
    held = _held(RenewingRegistry())  # the slot's lease ends at NOW + 60
    assert held.seconds_for_a_call(NOW + 20) == 60 - 20 - LEASE_TAIL_SECONDS

    held.seat = SlotLease(
        endpoint_id="lane", slot=0, lease_id="seat", task_id="t1", lease_until=NOW + 30
    )
    assert held.seconds_for_a_call(NOW + 20) == 30 - 20 - LEASE_TAIL_SECONDS


def test_a_slot_whose_renewal_was_lost_is_never_released_by_this_worker() -> None:
    registry = RenewingRegistry(lost=True)
    held = _held(registry)

    assert not held.renew_for("t2", lease_seconds=60, now=NOW)
    held.release(call_seconds=1.0)

    assert not held.held
    assert registry.released == []  # the lease may be someone else's now


class RefusingRegistry(LeaseRegistry):
    """Every take fails (another worker got there first), so the order of the tries shows."""

    def take_slot(self, e: Endpoint, slot: int, **kwargs: Any) -> SlotLease | None:  # type: ignore[override]
        self.asked.append({"endpoint_id": e.endpoint_id, "slot": slot})
        return None


def tried_order(
    fleet: Fleet, task_id: str, strategy: Strategy = Strategy.LEAST_LOADED
) -> list[tuple[str, int]]:
    registry = RefusingRegistry([fleet])
    slots = SlotBroker(
        registry,  # type: ignore[arg-type]
        health_max_age_seconds=90,
        balancer=Balancer(strategy),
        clock=lambda: NOW,
        sleep=lambda seconds: None,
    )
    request = SlotRequest(
        kind=TaskKind.IMAGE, task_id=task_id, user_id="u", lease_seconds=42, wait_seconds=0
    )
    with pytest.raises(NoFreeSlot):
        slots.acquire(request)
    return [(asked["endpoint_id"], asked["slot"]) for asked in registry.asked]


def four_slot_fleet(call_seconds: dict[str, float]) -> Fleet:
    return Fleet(
        endpoints=[named(e, capacity=4) for e in call_seconds],
        call_seconds={e: dict.fromkeys(range(4), s) for e, s in call_seconds.items()},
    )


def test_a_bursts_workers_reading_the_same_idle_fleet_try_different_slots_first() -> None:
    # Twelve workers that read the same idle fleet at once: in one fixed order, eleven of
    # them would fail their first take on the same slot.
    fleet = four_slot_fleet({"gpu-a": 4.0, "gpu-b": 4.1, "gpu-c": 3.9})

    firsts = [tried_order(fleet, f"task-{n}")[0] for n in range(120)]

    assert len(set(firsts)) == 12  # every slot is someone's first choice
    assert max(firsts.count(first) for first in set(firsts)) <= 25  # none draws a crowd


def test_a_task_tries_every_free_slot_once_in_an_order_its_id_fixes() -> None:
    fleet = four_slot_fleet({"gpu-a": 4.0, "gpu-b": 4.0})

    order = tried_order(fleet, "task-1")

    assert sorted(order) == [(e, s) for e in ("gpu-a", "gpu-b") for s in range(4)]
    assert tried_order(fleet, "task-1") == order
    assert any(tried_order(fleet, f"task-{n}") != order for n in range(2, 6))


def test_least_loaded_tries_a_slower_endpoints_slots_after_the_faster_ones_alike_loaded() -> None:
    fleet = four_slot_fleet({"gpu-fast": 4.0, "gpu-slow": 12.0, "gpu-fast2": 4.2})

    for n in range(20):
        order = tried_order(fleet, f"task-{n}")
        assert {e for e, _ in order[:8]} == {"gpu-fast", "gpu-fast2"}
        assert {e for e, _ in order[8:]} == {"gpu-slow"}


def test_least_loaded_tries_a_less_loaded_endpoints_slots_first() -> None:
    fleet = four_slot_fleet({"gpu-a": 4.0, "gpu-b": 4.0})
    fleet = Fleet(
        endpoints=fleet.endpoints,
        leases={"gpu-a": [busy("gpu-a")]},
        call_seconds=fleet.call_seconds,
    )

    for n in range(20):
        order = tried_order(fleet, f"task-{n}")
        assert [e for e, _ in order] == ["gpu-b"] * 4 + ["gpu-a"] * 3


def test_round_robin_keeps_its_endpoint_order_and_mixes_only_each_endpoints_slots() -> None:
    fleet = four_slot_fleet({"gpu-a": 4.0, "gpu-b": 4.0})

    orders = [tried_order(fleet, f"task-{n}", Strategy.ROUND_ROBIN) for n in range(8)]

    for order in orders:
        endpoints = [e for e, _ in order]
        assert endpoints in (["gpu-a"] * 4 + ["gpu-b"] * 4, ["gpu-b"] * 4 + ["gpu-a"] * 4)
    assert len({tuple(order[:4]) for order in orders}) > 2


# --- a slot kept across calls: its row is written only when readers would misjudge it ----


class RenewRegistry:
    """renew_slot as the table does it (kept, leased now, EWMA folded), counting writes."""

    def __init__(self) -> None:
        self.renewals: list[float] = []
        self.cuts: list[float] = []

    def renew_slot(
        self,
        lease: SlotLease,
        *,
        task_id: str,
        lease_seconds: float,
        now: float,
        call_seconds: float | None = None,
    ) -> SlotLease:
        self.renewals.append(now)
        ewma = call_seconds if call_seconds is not None else lease.call_seconds_ewma
        return lease.model_copy(
            update={
                "task_id": task_id,
                "lease_until": now + lease_seconds,
                "leased_at": now,
                "call_seconds_ewma": ewma,
                "kept": True,
            }
        )

    def cut_lease(self, lease: SlotLease, *, until: float) -> bool:
        self.cuts.append(until)
        return True


def kept_slot(registry: RenewRegistry, *, ewma: float = 4.0, seat: bool = False) -> HeldSlot:
    lease = SlotLease(
        endpoint_id="gpu",
        slot=0,
        lease_id="mine",
        task_id="t0",
        lease_until=NOW + 20,
        leased_at=NOW,
        call_seconds_ewma=ewma,
    )
    return HeldSlot(
        registry,  # type: ignore[arg-type]
        lease,
        endpoint(),
        seat=seat_held_by("t0") if seat else None,
    )


def run_calls(slot: HeldSlot, starts: list[float], seconds: float, needed: float = 15.0) -> None:
    """Back-to-back calls starting at `starts`, each renewing for the next at its end."""
    for i, start in enumerate(starts):
        slot.note_start(start)
        slot.note_call(seconds)
        slot.renew_for(f"t{i + 1}", lease_seconds=needed, now=start + seconds)


def test_a_kept_slot_writes_its_row_once_then_not_while_calls_run_as_the_row_says() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry)

    run_calls(slot, [NOW + 4 * i for i in range(10)], 4.0, needed=155.0)

    # The first hand-off writes (the row did not say kept); the lease then covers the next
    # calls (155 s needed + 60 s slack), and readers reckon them right from the row.
    assert registry.renewals == [NOW + 4]
    assert slot.renewals_skipped == 9
    assert slot.lease.kept


def test_a_kept_slot_writes_again_when_its_lease_would_not_cover_the_next_call() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry)

    run_calls(slot, [NOW + 4 * i for i in range(30)], 4.0, needed=155.0)

    # 4 + 215 s of lease: the call starting past 4 + 60 s would not fit it.
    assert len(registry.renewals) == 2
    assert registry.renewals[1] - registry.renewals[0] > 60 - 4


def test_a_kept_slot_writes_when_its_calls_drift_from_the_reckoning() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry)

    # 0.1 s between calls: readers reckoning 4 s calls from the row drift 0.1 s a call.
    run_calls(slot, [NOW + 4.1 * i for i in range(8)], 4.0)

    assert len(registry.renewals) == 3  # first, then each time the drift passed 0.25 s
    assert registry.renewals[1] == pytest.approx(NOW + 4.1 * 3 + 4.0)


def test_a_kept_slot_writes_when_a_call_is_off_the_rows_average() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry)
    run_calls(slot, [NOW, NOW + 4], 4.0)
    assert len(registry.renewals) == 1

    slot.note_start(NOW + 8)
    slot.note_call(6.0)  # the endpoint got slower: the row's 4 s would mislead
    slot.renew_for("t9", lease_seconds=15.0, now=NOW + 14)

    assert len(registry.renewals) == 2
    assert slot.lease.call_seconds_ewma == 6.0


def test_a_slot_with_a_lane_seat_writes_every_time() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry, seat=True)

    run_calls(slot, [NOW + 4 * i for i in range(4)], 4.0)

    assert len(registry.renewals) == 4


def test_a_timed_out_call_on_a_kept_slot_cuts_the_lease_to_the_margin() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry)
    run_calls(slot, [NOW], 4.0)

    slot.keep_until_lease_ends(now=NOW + 30, margin=5.0)

    assert registry.cuts == [NOW + 35]
    assert not slot.held


def test_a_fresh_lease_timing_out_is_left_to_lapse() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry)

    slot.keep_until_lease_ends(now=NOW + 10, margin=5.0)

    assert registry.cuts == []  # its lease is one call's: it ends on time


def test_a_kept_slots_slack_is_at_most_what_its_call_needs() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry, ewma=0.3)

    # Calls of 0.3 s needing 8 s of lease (a 3 s timeout and its margin): 16 s leased, so a
    # crashed holder's slot comes back within twice a call's lease, not a minute later.
    run_calls(slot, [NOW + 0.3 * i for i in range(40)], 0.3, needed=8.0)

    assert slot.lease.lease_until - registry.renewals[-1] == pytest.approx(16.0)
    assert len(registry.renewals) == 2  # 8 s of slack covers 26 calls


def test_a_short_calls_jitter_under_a_second_writes_nothing() -> None:
    registry = RenewRegistry()
    slot = kept_slot(registry, ewma=0.05)
    run_calls(slot, [NOW, NOW + 0.05], 0.05)  # the first hand-off marks the row kept

    slot.note_start(NOW + 0.1)
    slot.note_call(0.7)  # a loaded worker's slow moment, not another model
    slot.renew_for("t9", lease_seconds=15.0, now=NOW + 0.8)

    assert len(registry.renewals) == 1
