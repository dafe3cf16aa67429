"""Endpoint choice: pure logic ordering the endpoints a task may go to, best first.

Strategies (the `DispatchStrategy` stack parameter):
  least-loaded  lowest in-flight/capacity first, ties by the faster endpoint (default); at
                the tail of a burst it leaves a slower endpoint's free slot alone when the
                faster slots will finish every waiting task sooner (see `worth_taking`)
  round-robin   rotate over the endpoints with a free slot
  user-hash     consistent hashing of the user over the routable endpoints (session
                affinity), weighted by each endpoint's weight: a user stays on one endpoint
                while it is routable, and adding or removing an endpoint remaps only about
                1/N of the users
  weighted      random, proportional to each endpoint's weight
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from gpuqueue.models import Endpoint

VIRTUAL_NODES = 64  # points per endpoint on the hash ring: smooths the spread


class Strategy(StrEnum):
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"
    USER_HASH = "user-hash"
    WEIGHTED = "weighted"


@dataclass(frozen=True)
class Candidate:
    endpoint: Endpoint
    in_flight: int
    free_slots: int
    service_seconds: float | None = None  # measured seconds per call, if known

    @property
    def load(self) -> float:
        return self.in_flight / self.endpoint.capacity


def tasks_done_by(deadline: float, slots: Iterable[tuple[float, float]]) -> int:
    """How many tasks these slots, each (free at, seconds per call), finish by `deadline`."""
    return sum(
        int((deadline - free_at) // service)
        for free_at, service in slots
        if service > 0 and free_at + service <= deadline
    )


def worth_taking(
    finish_at: float,
    other_slots: Sequence[tuple[float, float]],
    backlog: Callable[[], int],
    fresh_backlog: Callable[[], int] | None = None,
) -> bool:
    """Whether a task should take a free slot that finishes it at `finish_at`.

    Yes unless the other slots (free or about to be) would finish every task not yet
    started, this one included, by then: then a slower endpoint would only stretch the
    tail. The backlog is asked for only when that question arises (a slower slot is free
    while faster ones could do better), so a homogeneous fleet never pays for it. A
    cached count overstates it by the tasks started since it was read: when it says yes
    by no more than one task per faster slot (the tail is near), `fresh_backlog` (a new
    read) decides.
    """
    better = tasks_done_by(finish_at, other_slots)
    if better == 0:
        return True
    waiting = backlog()
    if fresh_backlog is not None and better < waiting <= better + len(other_slots):
        waiting = fresh_backlog()
    return waiting > better


def _point(value: str) -> int:
    return int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "big")


def hash_ring_order(
    endpoint_ids: Collection[str], key: str, weights: Mapping[str, int] | None = None
) -> list[str]:
    """Endpoints in the order a consistent-hash ring visits them from the key's point.

    An endpoint with weight w gets w times the points, so about w times the users.
    """
    weights = weights or {}
    ring = sorted(
        (_point(f"{endpoint_id}#{i}"), endpoint_id)
        for endpoint_id in endpoint_ids
        for i in range(VIRTUAL_NODES * max(1, weights.get(endpoint_id, 1)))
    )
    if not ring:
        return []
    start = bisect.bisect(ring, (_point(key), ""))
    order: list[str] = []
    for _, endpoint_id in itertools.chain(ring[start:], ring[:start]):
        if endpoint_id not in order:
            order.append(endpoint_id)
            if len(order) == len(endpoint_ids):
                break
    return order


class Balancer:
    """Orders candidates for one task. Holds the round-robin cursor (one per container)."""

    def __init__(
        self, strategy: Strategy = Strategy.LEAST_LOADED, rng: random.Random | None = None
    ):
        self.strategy = strategy
        self._counter = itertools.count()
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not secrets

    def order(
        self,
        candidates: Sequence[Candidate],
        *,
        routable: Sequence[Endpoint] = (),
        user_id: str = "",
        avoid: Collection[str] = (),
    ) -> list[Candidate]:
        """Candidates (endpoints with a free slot) best first; `avoid` ones go last."""
        if self.strategy is Strategy.USER_HASH:
            return self._home(candidates, routable, user_id, avoid)
        preferred = [c for c in candidates if c.endpoint.endpoint_id not in avoid]
        fallback = [c for c in candidates if c.endpoint.endpoint_id in avoid]
        shift = next(self._counter)  # one step per call, however the candidates split
        return self._order(preferred, shift) + self._order(fallback, shift)

    def _order(self, candidates: Sequence[Candidate], shift: int) -> list[Candidate]:
        if not candidates:
            return []
        if self.strategy is Strategy.ROUND_ROBIN:
            shift %= len(candidates)
            ordered = sorted(candidates, key=lambda c: c.endpoint.endpoint_id)
            return ordered[shift:] + ordered[:shift]
        if self.strategy is Strategy.WEIGHTED:
            remaining = list(candidates)
            ordered = []
            while remaining:
                pick = self._rng.choices(remaining, weights=[c.endpoint.weight for c in remaining])[
                    0
                ]
                ordered.append(pick)
                remaining.remove(pick)
            return ordered
        return sorted(
            candidates,
            key=lambda c: (
                c.load,
                c.service_seconds if c.service_seconds is not None else 0.0,
                c.endpoint.latency_ewma_ms if c.endpoint.latency_ewma_ms is not None else 0.0,
                c.endpoint.endpoint_id,
            ),
        )

    @staticmethod
    def _home(
        candidates: Sequence[Candidate],
        routable: Sequence[Endpoint],
        user_id: str,
        avoid: Collection[str],
    ) -> list[Candidate]:
        """The user's home endpoint, if it has a free slot; else nothing (wait for it).

        The ring spans every routable endpoint, free or busy, so a home does not move while
        it is merely busy. An endpoint that just failed this task is skipped: the next one
        on the ring becomes its home for the retry.
        """
        ring = [e.endpoint_id for e in routable if e.endpoint_id not in avoid]
        if not ring:
            ring = [e.endpoint_id for e in routable]
        order = hash_ring_order(ring, user_id, {e.endpoint_id: e.weight for e in routable})
        by_id = {c.endpoint.endpoint_id: c for c in candidates}
        return [by_id[order[0]]] if order and order[0] in by_id else []


def pick_endpoint(
    balancer: Balancer,
    candidates: Sequence[Candidate],
    *,
    routable: Sequence[Endpoint] = (),
    user_id: str = "",
    avoid: Collection[str] = (),
) -> Endpoint | None:
    """The single best endpoint, or None."""
    ordered = balancer.order(candidates, routable=routable, user_id=user_id, avoid=avoid)
    return ordered[0].endpoint if ordered else None
