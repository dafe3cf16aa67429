"""Endpoint choice: how each strategy orders the endpoints that have a free slot."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Sequence

import pytest

from gpuqueue.fleet.balancer import (
    Balancer,
    Candidate,
    Strategy,
    hash_ring_order,
    pick_endpoint,
    tasks_done_by,
    worth_taking,
)
from gpuqueue.models import Endpoint, TaskKind

FLEET_IDS = [f"gpu-{i:02d}" for i in range(10)]
USERS = [f"user-{i}" for i in range(2000)]


def endpoint(
    endpoint_id: str,
    *,
    capacity: int = 1,
    weight: int = 1,
    latency_ewma_ms: float | None = None,
) -> Endpoint:
    return Endpoint(
        endpoint_id=endpoint_id,
        url=f"http://{endpoint_id}:8000",
        kind=TaskKind.IMAGE,
        capacity=capacity,
        weight=weight,
        healthy=True,
        latency_ewma_ms=latency_ewma_ms,
    )


def candidate(
    endpoint_id: str,
    *,
    in_flight: int = 0,
    capacity: int = 1,
    weight: int = 1,
    latency_ewma_ms: float | None = None,
) -> Candidate:
    e = endpoint(endpoint_id, capacity=capacity, weight=weight, latency_ewma_ms=latency_ewma_ms)
    return Candidate(endpoint=e, in_flight=in_flight, free_slots=capacity - in_flight)


def idle(*ids: str) -> list[Candidate]:
    return [candidate(i) for i in ids]


def ids_of(ordered: Sequence[Candidate]) -> list[str]:
    return [c.endpoint.endpoint_id for c in ordered]


def first_choice(
    balancer: Balancer,
    candidates: Sequence[Candidate],
    *,
    routable: Sequence[Endpoint] = (),
    user_id: str = "",
    avoid: Collection[str] = (),
) -> str | None:
    chosen = pick_endpoint(balancer, candidates, routable=routable, user_id=user_id, avoid=avoid)
    return chosen.endpoint_id if chosen else None


def homes(ids: Sequence[str], users: Sequence[str] = USERS) -> dict[str, str | None]:
    """Each user's user-hash endpoint when every endpoint in `ids` has a free slot."""
    pool = idle(*ids)
    routable = [c.endpoint for c in pool]
    balancer = Balancer(Strategy.USER_HASH)
    return {u: first_choice(balancer, pool, routable=routable, user_id=u) for u in users}


@pytest.fixture(scope="module")
def fleet_homes() -> dict[str, str | None]:
    return homes(FLEET_IDS)


# --- least-loaded ---------------------------------------------------------------------------


def test_least_loaded_is_the_default_strategy() -> None:
    assert Balancer().strategy is Strategy.LEAST_LOADED


def test_least_loaded_orders_by_in_flight_relative_to_capacity() -> None:
    pool = [
        candidate("gpu-a", in_flight=1, capacity=2),  # 0.50
        candidate("gpu-b", in_flight=1, capacity=4),  # 0.25
        candidate("gpu-c", in_flight=0, capacity=1),  # 0.00
    ]

    assert ids_of(Balancer(Strategy.LEAST_LOADED).order(pool)) == ["gpu-c", "gpu-b", "gpu-a"]


def test_least_loaded_prefers_the_lower_latency_ewma_on_equal_load() -> None:
    pool = [
        candidate("gpu-a", in_flight=1, capacity=2, latency_ewma_ms=900.0),
        candidate("gpu-b", in_flight=2, capacity=4, latency_ewma_ms=300.0),
    ]

    assert ids_of(Balancer(Strategy.LEAST_LOADED).order(pool)) == ["gpu-b", "gpu-a"]


def test_least_loaded_lets_load_outrank_latency() -> None:
    pool = [
        candidate("gpu-fast", in_flight=1, capacity=2, latency_ewma_ms=100.0),
        candidate("gpu-slow", in_flight=0, capacity=2, latency_ewma_ms=5000.0),
    ]

    assert ids_of(Balancer(Strategy.LEAST_LOADED).order(pool)) == ["gpu-slow", "gpu-fast"]


def test_least_loaded_breaks_full_ties_by_endpoint_id() -> None:
    pool = [candidate(i, latency_ewma_ms=200.0) for i in ("gpu-c", "gpu-a", "gpu-b")]

    assert ids_of(Balancer(Strategy.LEAST_LOADED).order(pool)) == ["gpu-a", "gpu-b", "gpu-c"]


# --- round-robin ----------------------------------------------------------------------------


def test_round_robin_moves_the_first_choice_on_each_call() -> None:
    balancer = Balancer(Strategy.ROUND_ROBIN)
    pool = idle("gpu-a", "gpu-b", "gpu-c")

    chosen = [first_choice(balancer, pool) for _ in range(6)]

    assert chosen == ["gpu-a", "gpu-b", "gpu-c"] * 2


def test_round_robin_returns_every_candidate_on_each_call() -> None:
    balancer = Balancer(Strategy.ROUND_ROBIN)
    pool = idle("gpu-a", "gpu-b", "gpu-c")

    orders = [ids_of(balancer.order(pool)) for _ in range(3)]

    assert all(sorted(o) == ["gpu-a", "gpu-b", "gpu-c"] for o in orders)


def test_round_robin_gives_each_candidate_an_equal_share_of_first_choices() -> None:
    balancer = Balancer(Strategy.ROUND_ROBIN)
    pool = idle("gpu-a", "gpu-b", "gpu-c", "gpu-d")

    counts = Counter(first_choice(balancer, pool) for _ in range(400))

    assert counts == dict.fromkeys(["gpu-a", "gpu-b", "gpu-c", "gpu-d"], 100)


def test_round_robin_rotation_does_not_depend_on_the_input_order() -> None:
    balancer = Balancer(Strategy.ROUND_ROBIN)
    shuffled = [idle("gpu-c", "gpu-a", "gpu-b"), idle("gpu-b", "gpu-c", "gpu-a")] * 2

    chosen = [first_choice(balancer, pool) for pool in shuffled]

    assert chosen == ["gpu-a", "gpu-b", "gpu-c", "gpu-a"]


# --- weighted -------------------------------------------------------------------------------


def test_weighted_gives_first_choices_in_proportion_to_weight() -> None:
    balancer = Balancer(Strategy.WEIGHTED, rng=random.Random(1234))
    pool = [candidate("gpu-heavy", weight=3), candidate("gpu-light", weight=1)]

    counts = Counter(first_choice(balancer, pool) for _ in range(4000))

    assert 0.70 <= counts["gpu-heavy"] / 4000 <= 0.80


def test_weighted_returns_every_candidate_once() -> None:
    balancer = Balancer(Strategy.WEIGHTED, rng=random.Random(7))
    pool = [candidate("gpu-a", weight=5), candidate("gpu-b", weight=1), candidate("gpu-c")]

    assert sorted(ids_of(balancer.order(pool))) == ["gpu-a", "gpu-b", "gpu-c"]


def test_weighted_choices_repeat_with_the_same_seed() -> None:
    pool = [candidate("gpu-a", weight=2), candidate("gpu-b"), candidate("gpu-c", weight=3)]

    def run(seed: int) -> list[str | None]:
        balancer = Balancer(Strategy.WEIGHTED, rng=random.Random(seed))
        return [first_choice(balancer, pool) for _ in range(50)]

    assert run(99) == run(99)


# --- avoid (endpoints that already failed this task) ----------------------------------------

NON_HASH_STRATEGIES = [Strategy.LEAST_LOADED, Strategy.ROUND_ROBIN, Strategy.WEIGHTED]


@pytest.mark.parametrize("strategy", NON_HASH_STRATEGIES)
def test_avoided_endpoints_come_after_all_others(strategy: Strategy) -> None:
    balancer = Balancer(strategy, rng=random.Random(3))
    pool = idle("gpu-a", "gpu-b", "gpu-c", "gpu-d")

    ordered = ids_of(balancer.order(pool, avoid={"gpu-a", "gpu-c"}))

    assert set(ordered[2:]) == {"gpu-a", "gpu-c"}


@pytest.mark.parametrize("strategy", NON_HASH_STRATEGIES)
def test_avoided_endpoints_are_still_offered(strategy: Strategy) -> None:
    balancer = Balancer(strategy, rng=random.Random(3))

    assert ids_of(balancer.order(idle("gpu-a"), avoid={"gpu-a"})) == ["gpu-a"]


def test_least_loaded_puts_an_avoided_endpoint_last_even_when_it_is_idle() -> None:
    pool = [
        candidate("gpu-a", in_flight=0, capacity=4),
        candidate("gpu-b", in_flight=3, capacity=4),
    ]

    ordered = ids_of(Balancer(Strategy.LEAST_LOADED).order(pool, avoid={"gpu-a"}))

    assert ordered == ["gpu-b", "gpu-a"]


# --- user-hash ------------------------------------------------------------------------------


def test_user_hash_gives_a_user_the_same_home_on_every_call() -> None:
    pool = idle(*FLEET_IDS)
    routable = [c.endpoint for c in pool]
    balancer = Balancer(Strategy.USER_HASH)

    chosen = {first_choice(balancer, pool, routable=routable, user_id="alice") for _ in range(20)}

    assert len(chosen) == 1


def test_user_hash_home_is_the_same_in_every_container() -> None:
    pool = idle(*FLEET_IDS)
    routable = [c.endpoint for c in pool]

    chosen = {
        first_choice(Balancer(Strategy.USER_HASH), pool, routable=routable, user_id="alice")
        for _ in range(5)
    }

    assert len(chosen) == 1


def test_user_hash_home_does_not_depend_on_the_candidate_order() -> None:
    pool = idle(*FLEET_IDS)
    routable = [c.endpoint for c in pool]
    balancer = Balancer(Strategy.USER_HASH)

    forward = first_choice(balancer, pool, routable=routable, user_id="bob")
    backward = first_choice(balancer, pool[::-1], routable=routable[::-1], user_id="bob")

    assert forward == backward


def test_user_hash_offers_only_the_home_endpoint() -> None:
    pool = idle(*FLEET_IDS)
    routable = [c.endpoint for c in pool]

    ordered = Balancer(Strategy.USER_HASH).order(pool, routable=routable, user_id="carol")

    assert ids_of(ordered) == [hash_ring_order(FLEET_IDS, "carol")[0]]


def test_user_hash_waits_when_the_home_has_no_free_slot() -> None:
    routable = [endpoint(i) for i in FLEET_IDS]
    home = hash_ring_order(FLEET_IDS, "dave")[0]
    with_free_slot = idle(*(i for i in FLEET_IDS if i != home))

    ordered = Balancer(Strategy.USER_HASH).order(with_free_slot, routable=routable, user_id="dave")

    assert ordered == []


def test_user_hash_home_does_not_move_when_other_endpoints_are_busy() -> None:
    routable = [endpoint(i) for i in FLEET_IDS]
    home = hash_ring_order(FLEET_IDS, "erin")[0]
    others = [i for i in FLEET_IDS if i != home]
    with_free_slot = idle(home, others[0], others[-1])

    chosen = first_choice(
        Balancer(Strategy.USER_HASH), with_free_slot, routable=routable, user_id="erin"
    )

    assert chosen == home


def test_user_hash_retry_goes_to_the_next_endpoint_on_the_ring() -> None:
    pool = idle(*FLEET_IDS)
    routable = [c.endpoint for c in pool]
    home, next_on_ring = hash_ring_order(FLEET_IDS, "frank")[:2]

    chosen = first_choice(
        Balancer(Strategy.USER_HASH), pool, routable=routable, user_id="frank", avoid={home}
    )

    assert chosen == next_on_ring


def test_user_hash_uses_the_home_again_when_every_endpoint_was_avoided() -> None:
    pool = idle(*FLEET_IDS)
    routable = [c.endpoint for c in pool]
    home = hash_ring_order(FLEET_IDS, "grace")[0]

    chosen = first_choice(
        Balancer(Strategy.USER_HASH), pool, routable=routable, user_id="grace", avoid=FLEET_IDS
    )

    assert chosen == home


def test_user_hash_has_no_home_without_routable_endpoints() -> None:
    assert first_choice(Balancer(Strategy.USER_HASH), idle("gpu-a"), user_id="heidi") is None


def test_removing_an_endpoint_moves_only_the_users_it_was_home_to(
    fleet_homes: dict[str, str | None],
) -> None:
    removed = FLEET_IDS[3]

    after = homes([i for i in FLEET_IDS if i != removed])

    moved = {u for u in USERS if after[u] != fleet_homes[u]}
    assert moved == {u for u in USERS if fleet_homes[u] == removed}


def test_adding_an_endpoint_moves_only_a_small_share_of_users(
    fleet_homes: dict[str, str | None],
) -> None:
    after = homes([*FLEET_IDS, "gpu-10"])

    moved = [u for u in USERS if after[u] != fleet_homes[u]]
    assert 0 < len(moved) / len(USERS) < 0.20
    assert {after[u] for u in moved} == {"gpu-10"}


def test_user_hash_spreads_homes_over_every_endpoint(fleet_homes: dict[str, str | None]) -> None:
    counts = Counter(fleet_homes.values())
    fair_share = len(USERS) / len(FLEET_IDS)

    assert set(counts) == set(FLEET_IDS)
    assert max(counts.values()) <= 2.5 * fair_share


def test_hash_ring_order_lists_every_endpoint_once() -> None:
    assert sorted(hash_ring_order(FLEET_IDS, "ivan")) == sorted(FLEET_IDS)


def test_hash_ring_order_is_empty_without_endpoints() -> None:
    assert hash_ring_order([], "judy") == []


# --- pick_endpoint --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(Strategy))
def test_pick_endpoint_returns_none_without_candidates(strategy: Strategy) -> None:
    routable = [endpoint("gpu-a")]

    assert pick_endpoint(Balancer(strategy), [], routable=routable, user_id="kim") is None


def test_pick_endpoint_returns_the_first_in_order() -> None:
    pool = [candidate("gpu-a", in_flight=1, capacity=2), candidate("gpu-b")]

    assert first_choice(Balancer(Strategy.LEAST_LOADED), pool) == "gpu-b"


# --- the tail rule (least-loaded) -------------------------------------------------------------


def test_tasks_done_by_counts_whole_calls_per_slot() -> None:
    # A slot free now does 3 calls of 4 s in 12 s; one free in 2 s does 2; too late: none.
    assert tasks_done_by(12.0, [(0.0, 4.0), (2.0, 4.0), (9.0, 4.0)]) == 5


def test_a_slower_slot_is_left_alone_when_faster_slots_clear_the_backlog_first() -> None:
    # 12 s on the slow slot; two fast slots (4 s) finish 6 tasks by then; 5 wait.
    fast = [(0.0, 4.0), (0.0, 4.0)]

    assert not worth_taking(12.0, fast, lambda: 5)
    assert worth_taking(12.0, fast, lambda: 7)


def test_the_backlog_is_not_asked_for_when_nothing_faster_exists() -> None:
    def backlog() -> int:
        raise AssertionError("the queue depth should not be read")

    assert worth_taking(4.0, [(3.0, 4.0)], backlog)
    assert worth_taking(4.0, [], backlog)


def test_least_loaded_prefers_the_measured_faster_endpoint_on_equal_load() -> None:
    slow = Candidate(endpoint=endpoint("a-slow"), in_flight=0, free_slots=1, service_seconds=12.0)
    fast = Candidate(endpoint=endpoint("b-fast"), in_flight=0, free_slots=1, service_seconds=4.0)

    assert [c.endpoint.endpoint_id for c in Balancer().order([slow, fast])] == ["b-fast", "a-slow"]


def test_near_the_tail_a_fresh_count_decides_not_the_cached_one() -> None:
    # Two fast slots finish 6 tasks by the slow slot's 12 s. A cached count of 7 (read a
    # second ago) says take; read again it is 6 (a task started since): leave it.
    fast = [(0.0, 4.0), (0.0, 4.0)]
    reads: list[int] = []

    def fresh() -> int:
        reads.append(6)
        return 6

    assert not worth_taking(12.0, fast, lambda: 7, fresh)
    assert reads == [6]
    # Far from the tail (more waiting than one per faster slot beyond): no new read.
    assert worth_taking(12.0, fast, lambda: 9, fresh)
    # A cached count that already says leave it needs no new read either.
    assert not worth_taking(12.0, fast, lambda: 6, fresh)
    assert reads == [6]
