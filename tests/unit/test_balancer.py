"""Round-robin choice among routable GPU endpoints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from gpuqueue.balancer import RoundRobinBalancer
from gpuqueue.models import Endpoint, TaskKind


def endpoints(*ids: str) -> list[Endpoint]:
    return [
        Endpoint(endpoint_id=i, url=f"http://{i}:8000", kind=TaskKind.IMAGE, healthy=True)
        for i in ids
    ]


def picks(
    balancer: RoundRobinBalancer, pool: list[Endpoint], n: int, avoid: Collection[str] = ()
) -> list[str | None]:
    chosen = [balancer.pick_endpoint(pool, avoid=avoid) for _ in range(n)]
    return [e.endpoint_id if e else None for e in chosen]


def test_round_robin_visits_every_endpoint_in_turn() -> None:
    pool = endpoints("gpu-a", "gpu-b", "gpu-c")

    assert picks(RoundRobinBalancer(), pool, 6) == ["gpu-a", "gpu-b", "gpu-c"] * 2


def test_round_robin_spreads_load_evenly() -> None:
    pool = endpoints("gpu-a", "gpu-b", "gpu-c", "gpu-d")

    counts = Counter(picks(RoundRobinBalancer(), pool, 400))

    assert set(counts.values()) == {100}


def test_round_robin_skips_the_endpoint_that_just_failed() -> None:
    pool = endpoints("gpu-a", "gpu-b", "gpu-c")

    chosen = picks(RoundRobinBalancer(), pool, 10, avoid={"gpu-b"})

    assert "gpu-b" not in chosen
    assert set(chosen) == {"gpu-a", "gpu-c"}


def test_round_robin_falls_back_to_a_failed_endpoint_when_it_is_the_only_one() -> None:
    pool = endpoints("gpu-a")

    assert picks(RoundRobinBalancer(), pool, 3, avoid={"gpu-a"}) == ["gpu-a"] * 3


def test_round_robin_uses_every_endpoint_when_all_of_them_just_failed() -> None:
    pool = endpoints("gpu-a", "gpu-b")

    chosen = picks(RoundRobinBalancer(), pool, 4, avoid={"gpu-a", "gpu-b"})

    assert set(chosen) == {"gpu-a", "gpu-b"}


def test_round_robin_has_nothing_to_pick_without_endpoints() -> None:
    assert RoundRobinBalancer().pick_endpoint([]) is None
