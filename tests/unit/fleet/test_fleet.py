"""A kind's fleet as read in one query: free slots per endpoint, and which endpoints take work."""

from __future__ import annotations

from typing import Any

import pytest

from gpuqueue.fleet.endpoint_registry import Fleet
from gpuqueue.models import CircuitState, Endpoint, EndpointState, SlotLease, TaskKind

NOW = 1_800_000_000.0
MAX_AGE = 90.0


def endpoint(endpoint_id: str = "gpu-a", **overrides: Any) -> Endpoint:
    fields: dict[str, Any] = {
        "endpoint_id": endpoint_id,
        "url": f"http://{endpoint_id}:8000",
        "kind": TaskKind.IMAGE,
        "healthy": True,
        "last_checked_at": NOW - 10,
        **overrides,
    }
    return Endpoint.model_validate(fields)


def lease(slot: int, *, until: float, endpoint_id: str = "gpu-a") -> SlotLease:
    return SlotLease(
        endpoint_id=endpoint_id,
        slot=slot,
        lease_id=f"lease-{endpoint_id}-{slot}",
        task_id=f"task-{slot}",
        lease_until=until,
    )


def live(slot: int, endpoint_id: str = "gpu-a") -> SlotLease:
    return lease(slot, until=NOW + 60, endpoint_id=endpoint_id)


def expired(slot: int, endpoint_id: str = "gpu-a") -> SlotLease:
    return lease(slot, until=NOW - 1, endpoint_id=endpoint_id)


def fleet_of(e: Endpoint, *leases: SlotLease) -> Fleet:
    return Fleet(endpoints=[e], leases={e.endpoint_id: list(leases)} if leases else {})


# --- Fleet.free_slots -------------------------------------------------------------------------


def test_an_endpoint_without_leases_offers_every_slot() -> None:
    e = endpoint(capacity=3)

    assert fleet_of(e).free_slots(e, NOW) == [0, 1, 2]


def test_a_live_lease_takes_its_slot() -> None:
    e = endpoint(capacity=3)

    assert fleet_of(e, live(1)).free_slots(e, NOW) == [0, 2]


def test_an_expired_lease_leaves_its_slot_free() -> None:
    e = endpoint(capacity=3)

    assert fleet_of(e, expired(1)).free_slots(e, NOW) == [0, 1, 2]


def test_an_endpoint_with_every_slot_leased_offers_none() -> None:
    e = endpoint(capacity=2)

    assert fleet_of(e, live(0), live(1)).free_slots(e, NOW) == []


def test_free_slots_never_exceed_capacity() -> None:
    e = endpoint(capacity=2)

    assert fleet_of(e).free_slots(e, NOW) == [0, 1]


def test_leases_beyond_a_reduced_capacity_still_count_against_it() -> None:
    e = endpoint(capacity=2)

    assert fleet_of(e, live(3)).free_slots(e, NOW) == [0]


def test_another_endpoints_leases_do_not_take_slots() -> None:
    e = endpoint("gpu-a", capacity=2)
    fleet = Fleet(endpoints=[e], leases={"gpu-b": [live(0, "gpu-b"), live(1, "gpu-b")]})

    assert fleet.free_slots(e, NOW) == [0, 1]


def test_a_half_open_endpoint_offers_one_slot_whatever_its_capacity() -> None:
    e = endpoint(capacity=4, circuit=CircuitState.HALF_OPEN)

    assert len(fleet_of(e).free_slots(e, NOW)) == 1


def test_a_half_open_endpoint_offers_no_slot_while_its_trial_call_runs() -> None:
    e = endpoint(capacity=4, circuit=CircuitState.HALF_OPEN)

    assert fleet_of(e, live(0)).free_slots(e, NOW) == []


def test_a_half_open_endpoint_offers_a_slot_again_once_the_trial_lease_expires() -> None:
    e = endpoint(capacity=4, circuit=CircuitState.HALF_OPEN)

    assert len(fleet_of(e, expired(0)).free_slots(e, NOW)) == 1


# --- Fleet.live_leases / in_flight --------------------------------------------------------------


def test_in_flight_counts_only_live_leases() -> None:
    e = endpoint(capacity=4)

    assert fleet_of(e, live(0), expired(1), live(2)).in_flight("gpu-a", NOW) == 2


def test_an_endpoint_without_lease_rows_has_nothing_in_flight() -> None:
    assert Fleet(endpoints=[endpoint()]).in_flight("gpu-a", NOW) == 0


def test_live_leases_leaves_out_expired_ones() -> None:
    e = endpoint(capacity=2)

    leases = fleet_of(e, expired(0), live(1)).live_leases("gpu-a", NOW)

    assert [x.slot for x in leases] == [1]


# --- Fleet.routable ---------------------------------------------------------------------------


def routable_ids(*endpoints: Endpoint) -> list[str]:
    return [e.endpoint_id for e in Fleet(endpoints=list(endpoints)).routable(NOW, MAX_AGE)]


def test_routable_includes_an_active_healthy_fresh_closed_endpoint() -> None:
    assert routable_ids(endpoint()) == ["gpu-a"]


@pytest.mark.parametrize("state", [EndpointState.DRAINING, EndpointState.DISABLED])
def test_routable_excludes_endpoints_that_are_not_active(state: EndpointState) -> None:
    assert routable_ids(endpoint(state=state)) == []


def test_routable_excludes_an_unhealthy_endpoint() -> None:
    assert routable_ids(endpoint(healthy=False)) == []


def test_routable_excludes_an_endpoint_whose_last_check_is_stale() -> None:
    assert routable_ids(endpoint(last_checked_at=NOW - MAX_AGE - 1)) == []


def test_routable_excludes_an_endpoint_never_checked() -> None:
    assert routable_ids(endpoint(last_checked_at=None)) == []


def test_routable_excludes_an_endpoint_with_an_open_circuit() -> None:
    assert routable_ids(endpoint(circuit=CircuitState.OPEN, opened_at=NOW - 5)) == []


def test_routable_includes_an_endpoint_with_a_half_open_circuit() -> None:
    assert routable_ids(endpoint(circuit=CircuitState.HALF_OPEN)) == ["gpu-a"]


def test_routable_keeps_the_good_endpoints_of_a_mixed_fleet() -> None:
    fleet = [
        endpoint("gpu-a"),
        endpoint("gpu-b", state=EndpointState.DRAINING),
        endpoint("gpu-c", circuit=CircuitState.HALF_OPEN),
        endpoint("gpu-d", healthy=False),
    ]

    assert routable_ids(*fleet) == ["gpu-a", "gpu-c"]


# --- Endpoint.usable_capacity -----------------------------------------------------------------


def test_usable_capacity_is_the_capacity_when_the_circuit_is_closed() -> None:
    assert endpoint(capacity=4).usable_capacity == 4


def test_usable_capacity_is_one_when_the_circuit_is_half_open() -> None:
    assert endpoint(capacity=4, circuit=CircuitState.HALF_OPEN).usable_capacity == 1


def test_usable_capacity_is_the_capacity_when_the_circuit_is_open() -> None:
    # Routing already excludes an open endpoint; its slot count is not what stops it.
    assert endpoint(capacity=4, circuit=CircuitState.OPEN).usable_capacity == 4


# --- measured call times --------------------------------------------------------------------


def test_service_time_is_the_mean_of_the_slots_measurements() -> None:
    e = endpoint(capacity=2)
    fleet = Fleet(endpoints=[e], call_seconds={"gpu-a": {0: 4.0, 1: 5.0}})

    assert fleet.service_seconds(e) == 4.5


def test_service_time_is_unknown_before_any_call() -> None:
    e = endpoint(capacity=2)

    assert fleet_of(e).service_seconds(e) is None


def test_slots_beyond_a_reduced_capacity_do_not_count_towards_service_time() -> None:
    e = endpoint(capacity=1)
    fleet = Fleet(endpoints=[e], call_seconds={"gpu-a": {0: 4.0, 3: 40.0}})

    assert fleet.service_seconds(e) == 4.0


def test_a_busy_slot_is_expected_free_one_service_time_after_its_lease_began() -> None:
    e = endpoint(capacity=3)
    busy = lease(0, until=NOW + 100).model_copy(update={"leased_at": NOW - 1.0})
    fleet = Fleet(endpoints=[e], leases={"gpu-a": [busy]}, call_seconds={"gpu-a": {0: 4.0}})

    assert fleet.slot_free_times(e, NOW) == [NOW, NOW, NOW + 3.0]


def test_an_overrunning_call_counts_as_freeing_now() -> None:
    e = endpoint(capacity=1)
    busy = lease(0, until=NOW + 100).model_copy(update={"leased_at": NOW - 9.0})
    fleet = Fleet(endpoints=[e], leases={"gpu-a": [busy]}, call_seconds={"gpu-a": {0: 4.0}})

    assert fleet.slot_free_times(e, NOW) == [NOW]


def test_a_kept_slot_is_reckoned_as_back_to_back_calls_from_its_row() -> None:
    e = endpoint(capacity=1)
    # Written 9 s ago by a holder running 4 s calls back to back: the third call, 1 s in.
    kept = lease(0, until=NOW + 100).model_copy(update={"leased_at": NOW - 9.0, "kept": True})
    fleet = Fleet(endpoints=[e], leases={"gpu-a": [kept]}, call_seconds={"gpu-a": {0: 4.0}})

    assert fleet.slot_free_times(e, NOW) == [NOW + 3.0]
    # Its row's age is no call overrunning: the endpoint is as fast as measured.
    assert fleet.service_seconds(e, NOW) == 4.0


def test_a_waiter_row_ending_now_no_longer_holds_a_slot_back() -> None:
    fleet = Fleet(endpoints=[], priority_waiters={"vip-1": NOW, "vip-2": NOW + 0.001})
    assert fleet.waiting_priority(NOW) == 1
    assert fleet.waiting_priority(NOW, besides="vip-2") == 0


def _busy_since(leased_at: float, slot: int = 0) -> SlotLease:
    return live(slot).model_copy(update={"leased_at": leased_at})


def test_an_endpoints_service_time_is_its_slots_average_or_its_longest_call_under_way() -> None:
    gpu = endpoint(capacity=2)
    measured = {"gpu-a": {0: 2.0, 1: 4.0}}
    quiet = Fleet(endpoints=[gpu], call_seconds=measured)
    # A call that has run 9 s, on a slot measured at 2-4 s: the endpoint is slower now.
    overrun = Fleet(
        endpoints=[gpu], leases={"gpu-a": [_busy_since(NOW - 9)]}, call_seconds=measured
    )
    on_time = Fleet(
        endpoints=[gpu], leases={"gpu-a": [_busy_since(NOW - 1)]}, call_seconds=measured
    )

    assert quiet.service_seconds(gpu) == quiet.service_seconds(gpu, NOW) == 3.0
    assert overrun.service_seconds(gpu) == 3.0  # the measurement alone
    assert overrun.service_seconds(gpu, NOW) == 9.0
    assert on_time.service_seconds(gpu, NOW) == 3.0
    # Never measured: unknown, however long a call runs.
    assert (
        Fleet(endpoints=[gpu], leases={"gpu-a": [_busy_since(NOW - 9)]}).service_seconds(gpu, NOW)
        is None
    )


def test_a_slot_whose_call_overran_its_estimate_is_not_expected_free_now() -> None:
    gpu = endpoint(capacity=1)
    fleet = Fleet(
        endpoints=[gpu], leases={"gpu-a": [_busy_since(NOW - 9)]}, call_seconds={"gpu-a": {0: 2.0}}
    )

    # By the 2 s average it should have ended 7 s ago; it still runs, so not before now + 0.
    [free_at] = fleet.slot_free_times(gpu, NOW)
    assert free_at >= NOW
    assert fleet.busy_until(gpu, NOW) == [NOW]
