"""SlotBroker: lease a free slot on the best routable endpoint of a kind.

Shared by the queue's dispatcher (image and speech tasks) and the synchronous speech
routes, so every GPU call, whichever path it takes, holds one of its endpoint's slots:
an endpoint never gets more concurrent calls than its capacity.

High-priority requests come first: while one waits, it keeps a waiter row in the endpoints
table, and normal requests take a free slot only if more slots are free than high-priority
tasks wait. No starvation: with `priority_lane_slots` set, a high-priority call also leases
one of the lane's seats (that many per kind) beside its slot, and waits without a waiter row
while every seat is held; so the lane holds at most that many slots of a kind and normal work
gets the rest, whatever number of high-priority workers run.

Least-loaded also looks at the measured call times (kept on the slot rows): at the tail of
a burst it leaves a slower endpoint's free slot alone when the faster slots will finish
every waiting task sooner (`balancer.worth_taking`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from aws_lambda_powertools import Logger

from gpuqueue.errors import StoreError
from gpuqueue.fleet.balancer import Balancer, Candidate, Strategy, worth_taking
from gpuqueue.fleet.endpoint_registry import EndpointRegistry, Fleet
from gpuqueue.models import Endpoint, Priority, SlotLease, TaskKind

logger = Logger(child=True)

# A waiting caller re-reads the fleet at least this often, whatever it expects.
MAX_POLL_SECONDS = 1.0
# How long a read of the queues' depth stays good enough for the tail decision (one read
# per container per period: GetQueueAttributes is not free).
BACKLOG_TTL_SECONDS = 2.0
# The tail rule only weighs endpoints clearly faster than the candidate, so measurement noise
# between equal endpoints never holds a task back.
FASTER_RATIO = 1.2
FASTER_MIN_SECONDS = 0.25
# A high-priority waiter's row stands this long; it is renewed at every read of the fleet
# (at least once per MAX_POLL_SECONDS), so only a crashed waiter's row lapses.
WAITER_ROW_SECONDS = 3.0
# A call ends this long before its slot's lease at the latest: time for the client's close to
# reach the GPU server, and for two machines' clocks to disagree.
LEASE_TAIL_SECONDS = 0.5
# A slot kept across calls is leased this much longer than its next call needs (at most as
# long again), so its holder need not write the row before every call (HeldSlot.renew_for);
# a crashed holder's slot comes back that much later.
KEPT_LEASE_SLACK_SECONDS = 60.0
# ... as long as readers reckoning its calls back to back from the row (call_started) are
# this close to when the next call really starts, and its call time to the row's average
# (within this fraction, or this many seconds for calls so short that it hardly matters: a
# loaded worker's jitter; a real change shows as drift at the next call anyway).
KEPT_DRIFT_SECONDS = 0.25
KEPT_SERVICE_TOLERANCE = 0.25
KEPT_SERVICE_FLOOR_SECONDS = 1.0


def _candidate(fleet: Fleet, endpoint: Endpoint, now: float, *, free_slots: int) -> Candidate:
    """An endpoint as the balancer and the tail rule see it in this read of the fleet."""
    return Candidate(
        endpoint=endpoint,
        in_flight=fleet.in_flight(endpoint.endpoint_id, now),
        free_slots=free_slots,
        service_seconds=fleet.service_seconds(endpoint, now),
    )


def _mix(task_id: str, endpoint_id: str, slot: int) -> int:
    """A stable pseudo-random rank of a slot for a task."""
    digest = hashlib.blake2b(f"{task_id}#{endpoint_id}#{slot}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def _slower(service: float, *, than: float) -> bool:
    """Whether calls taking `service` seconds are meaningfully slower than `than`."""
    return than * FASTER_RATIO < service and service - than > FASTER_MIN_SECONDS


class NoRoutableEndpoint(Exception):
    """No endpoint of the kind is ACTIVE, healthy and with a closed or half-open circuit."""


class NoFreeSlot(Exception):
    """Every routable endpoint's slots stayed busy for the whole wait."""


class HeldSlot:
    """A leased slot (and, for a high-priority call, the lane's seat leased with it),
    released once: early after a good call (with its duration), or in a `finally` otherwise."""

    def __init__(
        self,
        registry: EndpointRegistry,
        lease: SlotLease,
        endpoint: Endpoint,
        *,
        seat: SlotLease | None = None,
    ) -> None:
        self._registry = registry
        self.lease = lease
        self.endpoint = endpoint
        self.seat = seat
        self._released = False
        self._call_seconds: float | None = None  # the last good call's, not yet written
        self._last_call_seconds: float | None = None
        self._call_started: float | None = None
        self.renewals_skipped = 0

    @property
    def held(self) -> bool:
        """Still leased by us and not given back (nor left to lapse)."""
        return not self._released

    def note_start(self, at: float) -> None:
        """A call started on this slot at `at`."""
        self._call_started = at

    @property
    def call_ends_at(self) -> float | None:
        """When the call under way should end (None: unknown)."""
        expected = self.expected_call_seconds
        if self._call_started is None or expected is None:
            return None
        return self._call_started + expected

    def note_call(self, seconds: float) -> None:
        """A call on this slot ended well after `seconds`: folded into the slot's EWMA at the
        next renewal or release."""
        self._call_seconds = seconds
        self._last_call_seconds = seconds

    @property
    def expected_call_seconds(self) -> float | None:
        """How long a call on this slot should take: its last call's time, else the slot's
        measured average when it was leased (None: never measured)."""
        if self._last_call_seconds is not None:
            return self._last_call_seconds
        return self.lease.call_seconds_ewma

    def seconds_for_a_call(self, now: float) -> float:
        """How long a call starting at `now` may run and still end inside this slot's lease
        (and its lane seat's): a call outliving its lease shares the GPU with the call that
        takes the slot next. The lease was set before the control-plane writes that come
        ahead of the call; when they were slow, this is less than the lease asked for."""
        ends = min(lease.lease_until for lease in (self.lease, self.seat) if lease is not None)
        return ends - LEASE_TAIL_SECONDS - now

    def renew_for(
        self, task_id: str, *, lease_seconds: float, now: float, starts_at: float | None = None
    ) -> bool:
        """Keep the slot for another task, whose call starts at `starts_at` (now if None) and
        needs `lease_seconds` of lease. One write, leasing the slot KEPT_LEASE_SLACK_SECONDS
        longer (at most twice what the call needs), unless the row need not change: the
        lease already covers that call, it says the slot is kept, readers reckoning
        back-to-back calls from it put this call's start within KEPT_DRIFT_SECONDS, and the
        last call took about the row's average. False if
        the lease was lost meanwhile: the slot is no longer ours, take one afresh."""
        start = now if starts_at is None else max(now, starts_at)
        if self._row_still_true(start, lease_seconds):
            self.renewals_skipped += 1
            return True
        lease = self._registry.renew_slot(
            self.lease,
            task_id=task_id,
            lease_seconds=lease_seconds + min(KEPT_LEASE_SLACK_SECONDS, lease_seconds),
            now=now,
            call_seconds=self._call_seconds,
        )
        if lease is None:
            self._released = True
            return False
        self.lease = lease
        self._call_seconds = None
        return True

    # pragma: no mutate start (how often the row is written, not what it says: tested apart)
    def _row_still_true(self, start: float, lease_seconds: float) -> bool:
        lease = self.lease
        service = lease.call_seconds_ewma
        last = self._last_call_seconds
        if (
            self.seat is not None  # a lane seat's lease is not renewed with it: as before
            or not lease.kept
            or lease.leased_at is None
            or service is None
            or last is None
            or lease.lease_until - start < lease_seconds
            or abs(last - service)
            > max(KEPT_SERVICE_TOLERANCE * service, KEPT_SERVICE_FLOOR_SECONDS)
        ):
            return False
        if service <= 0:
            return True  # calls under the row's millisecond: nothing to reckon
        calls = round((start - lease.leased_at) / service)
        return abs(start - (lease.leased_at + calls * service)) <= KEPT_DRIFT_SECONDS

    # pragma: no mutate end

    def keep_until_lease_ends(self, *, now: float | None = None, margin: float = 0.0) -> None:
        """Give the slot back by letting its lease lapse, not now (a later `release` is a
        no-op): for a call that may still be running on the GPU. The seat lapses with it
        (same lease end): the lane still holds that slot. A kept slot's lease, longer than
        one call, is cut to `margin` from `now` (if given) so the slot is not lost longer."""
        self._released = True
        if now is not None and self.lease.kept:
            try:
                self._registry.cut_lease(self.lease, until=now + margin)
            except StoreError:
                logger.warning("lease cut failed; it lapses at its end", exc_info=True)

    def release(self, *, call_seconds: float | None = None) -> None:
        """Hand the slot (and seat) back. A write that fails leaves the lease to lapse at its
        end instead: the slot comes back late, and the caller's finished work is not lost."""
        if not self._released:
            self._released = True
            if call_seconds is None:
                call_seconds = self._call_seconds
            for lease, seconds in ((self.lease, call_seconds), (self.seat, None)):
                if lease is None:
                    continue
                try:
                    self._registry.release_slot(lease, call_seconds=seconds)
                except StoreError:
                    logger.warning(
                        "slot release failed; the lease lapses at its end",
                        extra={"endpoint_id": lease.endpoint_id, "slot": lease.slot},
                        exc_info=True,
                    )


class _PriorityWait:
    """A high-priority request's waiter row: written when it could take a slot and none is
    free, renewed before it lapses, withdrawn once served, given up, or the lane is full
    (a request that may not take a slot must not hold normal work back)."""

    def __init__(self, registry: EndpointRegistry, request: SlotRequest) -> None:
        self._registry = registry
        self._request = request
        self._until: float | None = None  # until when our row stands, once written

    def announce(self, now: float) -> None:
        if self._until is None or self._until - now < WAITER_ROW_SECONDS / 2:
            until = now + WAITER_ROW_SECONDS
            self._registry.wait_with_priority(
                self._request.kind, self._request.task_id, until=until
            )
            self._until = until

    def withdraw(self) -> None:
        if self._until is not None:
            self._until = None
            self._registry.stop_waiting(self._request.kind, self._request.task_id)


# pragma: no mutate start (the tail rule's queue depth, not a lease: docs/mutation.md)
class _Backlog:
    """The number of messages in the task queues, read lazily and at most once a second."""

    def __init__(self, source: Callable[[], int] | None, clock: Callable[[], float]) -> None:
        self._source = source
        self._clock = clock
        self._value = 0
        self._read_at: float | None = None

    @property
    def known(self) -> bool:
        return self._source is not None

    def count(self, *, fresh: bool = False) -> int:
        """The count read within the last second, or (`fresh`) read now."""
        now = self._clock()
        if self._source is not None and (
            fresh or self._read_at is None or now - self._read_at >= BACKLOG_TTL_SECONDS
        ):
            self._value = self._source()
            self._read_at = now
        return self._value


# pragma: no mutate end


@dataclass(frozen=True)
class SlotRequest:
    kind: TaskKind
    task_id: str
    user_id: str
    lease_seconds: float
    wait_seconds: float
    # Endpoints that already failed this task: used again only if nothing else is routable,
    # or never, with `untried_only` (a synchronous retry goes to another endpoint or nowhere).
    tried: Collection[str] = ()
    untried_only: bool = False
    priority: Priority = Priority.NORMAL


class SlotBroker:
    # pragma: no mutate start (wiring: docs/mutation.md)
    def __init__(
        self,
        registry: EndpointRegistry,
        *,
        health_max_age_seconds: float,
        balancer: Balancer | None = None,
        poll_seconds: float = 0.1,
        backlog: Callable[[], int] | None = None,
        priority_lane_slots: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        view_max_age_seconds: float = 0.0,
    ) -> None:
        """`view_max_age_seconds`: how old a read of the fleet a worker keeping its slot
        may go by (0: it reads the fleet at every hand-off)."""
        if priority_lane_slots is not None and priority_lane_slots < 1:
            raise ValueError("priority_lane_slots must be at least 1 (None: no cap)")
        self._registry = registry
        # Slots of a kind the high-priority lane may hold at once; None: no cap.
        self._lane_slots = priority_lane_slots
        self._max_age = health_max_age_seconds
        self._balancer = balancer or Balancer()
        self._poll = poll_seconds
        # Messages in the task queues no worker holds (visible and delayed): the tasks not
        # started yet. Lets least-loaded hold a tail task back for a faster endpoint.
        # Without it every free slot is taken.
        self._backlog = _Backlog(backlog, clock)
        self._clock = clock
        self._sleep = sleep
        # The latest read of each kind's fleet and when it was made (by any worker here).
        self._views: dict[TaskKind, tuple[Fleet, float]] = {}
        self._view_max_age = view_max_age_seconds

    # pragma: no mutate end

    def _fleet(self, kind: TaskKind) -> Fleet:
        fleet = self._registry.fleet(kind, consistent=True)
        self._views[kind] = (fleet, self._clock())
        return fleet

    def acquire(self, request: SlotRequest) -> HeldSlot:
        """Lease a slot on the best endpoint, waiting up to `wait_seconds` for one."""
        if request.priority is not Priority.HIGH:
            held = self._acquire(request, waiter=None)
        else:
            waiter = _PriorityWait(self._registry, request)
            try:
                held = self._acquire(request, waiter=waiter)
            finally:
                waiter.withdraw()
        # The read it chose from shows that slot free: the view here shows it taken now,
        # so the other workers here go by it without trying that slot.
        view = self._views.get(request.kind)
        if view is not None:
            self._views[request.kind] = (view[0].with_lease(held.lease), view[1])
        return held

    def _acquire(self, request: SlotRequest, *, waiter: _PriorityWait | None) -> HeldSlot:
        give_up_at = self._clock() + request.wait_seconds
        backlog = self._backlog
        # First from a read made here within the view's age (a burst's workers start on
        # the read that found them free slots: one query less each); a take that fails
        # on it reads afresh at once. Takes are conditional, so a stale read costs a
        # failed take, never a slot over capacity.
        recent = self._view_max_age > 0
        while True:
            now = self._clock()
            fleet, recent = self._fleet_to_try(request.kind, now, recent=recent)
            routable = fleet.routable(now, self._max_age)
            if not routable:
                raise NoRoutableEndpoint(f"no healthy {request.kind.value} endpoint")
            untried = [e for e in routable if e.endpoint_id not in request.tried]
            if request.untried_only and not untried:
                raise NoRoutableEndpoint(f"no other healthy {request.kind.value} endpoint")
            eligible = untried or routable
            candidates = [
                _candidate(fleet, e, now, free_slots=n)
                for e in eligible
                if (n := len(fleet.free_slots(e, now)))
            ]
            ordered = self._balancer.order(
                candidates, routable=routable, user_id=request.user_id, avoid=request.tried
            )
            if waiter is None and sum(c.free_slots for c in candidates) <= fleet.waiting_priority(
                now
            ):
                ordered = []  # the free slots are the high-priority waiters'
            lane_full = waiter is not None and not self._lane_has_room(fleet, now)
            if not lane_full:
                held = self._take_best(
                    request, ordered, eligible=eligible, fleet=fleet, now=now, backlog=backlog
                )
                if held is not None:
                    return held
            if recent:
                recent = False
                continue
            if self._clock() >= give_up_at:
                raise NoFreeSlot(f"every {request.kind.value} GPU slot is busy")
            if waiter is not None:
                if lane_full:
                    waiter.withdraw()
                else:
                    waiter.announce(now)
            self._sleep(self._poll_delay(eligible, fleet, now, give_up_at))

    def _fleet_to_try(self, kind: TaskKind, now: float, *, recent: bool) -> tuple[Fleet, bool]:
        """The read to try a take on: a recent one here if `recent` and it has a routable
        endpoint (and True), else a fresh one (and False)."""
        if recent:
            fleet = self._recent_fleet(kind, self._view_max_age)
            if fleet.routable(now, self._max_age):
                return fleet, True
        return self._fleet(kind), False

    # pragma: no mutate start (the kept slot's hand-off, issue 16: docs/mutation.md)
    @property
    def keeps_slots(self) -> bool:
        """Whether a worker may keep its slot across tasks: least-loaded only (the other
        strategies choose an endpoint per task)."""
        return self._balancer.strategy is Strategy.LEAST_LOADED

    def worth_keeping(
        self, held: HeldSlot, *, priority: Priority, holding_task: bool = False
    ) -> bool:
        """Whether a worker holding `held` after a finished call should take its next task on
        it (one read of the fleet, or a read made here within the view's age) rather than
        give it back: the strategy is least-loaded (the
        others choose an endpoint per task), the endpoint is still routable, no high-priority
        task waits for a slot a normal one would take, a lane seat is not involved, and the
        tail rule does not leave this endpoint for faster ones. `holding_task`: the worker
        has its next message in hand already (received early), one the queue's depth no
        longer counts."""
        if not held.held or held.seat is not None:
            return False
        if self._balancer.strategy is not Strategy.LEAST_LOADED:
            # The others choose an endpoint per task (each user's own, the next in turn, by
            # weight): a kept slot would decide for them.
            return False
        now = self._clock()
        endpoint = held.endpoint
        fleet = self._recent_fleet(endpoint.kind, self._view_max_age)
        routable = fleet.routable(now, self._max_age)
        if all(e.endpoint_id != endpoint.endpoint_id for e in routable):
            return False  # draining, disabled, unhealthy or its circuit open
        if priority is not Priority.HIGH:
            free = 1 + sum(len(fleet.free_slots(e, now)) for e in routable)
            if free <= fleet.waiting_priority(now):
                return False  # ours is one a high-priority waiter should have
        candidate = _candidate(fleet, endpoint, now, free_slots=1)
        return self._worth_taking(
            candidate, routable, fleet, now, self._backlog, holding_task=holding_task
        )

    def free_slot_count(self, kinds: Iterable[TaskKind], *, max_age_seconds: float) -> int:
        """How many slots nobody holds on the routable endpoints of these kinds, and that a
        task would take now (not a slower endpoint's the tail rule leaves for faster ones),
        by a read of the fleet made here within `max_age_seconds`: a worker with room for
        another call looks before it takes more messages, which would otherwise wait (for
        a slot whose own worker then finds the queue empty) and come back. Under load the
        hand-offs keep the read fresh."""
        now = self._clock()
        count = 0
        for kind in kinds:
            fleet = self._recent_fleet(kind, max_age_seconds)
            routable = fleet.routable(now, self._max_age)
            for endpoint in routable:
                free = len(fleet.free_slots(endpoint, now))
                if free and self._worth_taking(
                    _candidate(fleet, endpoint, now, free_slots=free),
                    routable,
                    fleet,
                    now,
                    self._backlog,
                    holding_task=False,
                ):
                    count += free
        return count

    def _recent_fleet(self, kind: TaskKind, max_age_seconds: float) -> Fleet:
        """The fleet as read here within `max_age_seconds` (by any worker), else read now."""
        view = self._views.get(kind)
        if view is not None and self._clock() - view[1] <= max_age_seconds:
            return view[0]
        return self._fleet(kind)

    # pragma: no mutate end

    def _lane_has_room(self, fleet: Fleet, now: float) -> bool:
        return self._lane_slots is None or bool(fleet.free_priority_seats(now, self._lane_slots))

    def _take_best(
        self,
        request: SlotRequest,
        ordered: list[Candidate],
        *,
        eligible: list[Endpoint],
        fleet: Fleet,
        now: float,
        backlog: _Backlog,
    ) -> HeldSlot | None:
        """Lease a free slot of the first candidate worth it; a high-priority call under a
        lane cap takes one of the lane's seats first (and gives it back if no slot comes)."""
        lane_slots = self._lane_slots if request.priority is Priority.HIGH else None
        seat: SlotLease | None = None
        worth = {
            c.endpoint.endpoint_id: self._worth_taking(c, eligible, fleet, now, backlog)
            for c in ordered
        }
        for candidate, slot in self._slots_to_try(ordered, fleet, now, request.task_id):
            if not worth[candidate.endpoint.endpoint_id]:
                continue
            if seat is None and lane_slots is not None:
                seat = self._take_seat(request, fleet, now, lane_slots)
                if seat is None:
                    return None  # another high-priority call took the last seat meanwhile
            lease = self._registry.take_slot(
                candidate.endpoint,
                slot,
                task_id=request.task_id,
                lease_seconds=request.lease_seconds,
                now=now,
            )
            if lease is not None:
                return HeldSlot(self._registry, lease, candidate.endpoint, seat=seat)
        if seat is not None:
            self._registry.release_slot(seat)
        return None

    def _slots_to_try(
        self, ordered: list[Candidate], fleet: Fleet, now: float, task_id: str
    ) -> list[tuple[Candidate, int]]:
        """The candidates' free slots in the order to try them: the balancer's order, each
        endpoint's slots mixed, and under least-loaded the slots of alike endpoints mixed
        together, in an order drawn from the task's id (each task its own, and the same
        every time). Workers that read the fleet at the same moment (a burst's first
        tasks) would otherwise all try the same slot first: each take but one fails, and
        a burst of n workers costs ~n²/2 takes."""
        pairs = sorted(
            (
                (candidate, slot)
                for candidate in ordered
                for slot in fleet.free_slots(candidate.endpoint, now)
            ),
            key=lambda pair: _mix(task_id, pair[0].endpoint.endpoint_id, pair[1]),
        )
        if self._balancer.strategy is Strategy.LEAST_LOADED:
            # Alike: as loaded, and not slower than the fastest as loaded (the tail rule's
            # sense of slower); sorted is stable, so the order among alike ones is random.
            fastest: dict[float, float] = {}
            for c in ordered:
                if c.service_seconds is not None:
                    fastest[c.load] = min(fastest.get(c.load, c.service_seconds), c.service_seconds)

            def rank(pair: tuple[Candidate, int]) -> tuple[float, bool]:
                candidate = pair[0]
                best = fastest.get(candidate.load)
                return candidate.load, (
                    best is not None
                    and candidate.service_seconds is not None
                    and _slower(candidate.service_seconds, than=best)
                )

            return sorted(pairs, key=rank)
        order = {id(candidate): i for i, candidate in enumerate(ordered)}
        return sorted(pairs, key=lambda pair: order[id(pair[0])])

    def _take_seat(
        self, request: SlotRequest, fleet: Fleet, now: float, seats: int
    ) -> SlotLease | None:
        for seat in fleet.free_priority_seats(now, seats):
            lease = self._registry.take_priority_seat(
                request.kind,
                seat,
                task_id=request.task_id,
                lease_seconds=request.lease_seconds,
                now=now,
            )
            if lease is not None:
                return lease
        return None

    # pragma: no mutate start (the tail rule, not a lease: docs/mutation.md)
    def _worth_taking(
        self,
        candidate: Candidate,
        eligible: list[Endpoint],
        fleet: Fleet,
        now: float,
        backlog: _Backlog,
        *,
        holding_task: bool = True,
    ) -> bool:
        """Least-loaded only: skip a slower endpoint when faster slots clear the backlog sooner.
        `holding_task`: the task to place is in hand (a delivery), not still in the queue (a
        kept slot deciding whether to take the next one)."""
        if self._balancer.strategy is not Strategy.LEAST_LOADED or not backlog.known:
            return True
        service = candidate.service_seconds
        if service is None:
            return True
        others = [
            (free_at, other_service)
            for e in eligible
            if e.endpoint_id != candidate.endpoint.endpoint_id
            and (other_service := fleet.service_seconds(e, now)) is not None
            and _slower(service, than=other_service)
            for free_at in fleet.slot_free_times(e, now)
        ]

        def waiting(*, fresh: bool = False) -> int:
            # The tasks not started yet: the messages no worker holds (visible or delayed),
            # and the one in hand when a worker is placing its own task.
            return max(1, backlog.count(fresh=fresh) + (1 if holding_task else 0))

        return worth_taking(now + service, others, waiting, lambda: waiting(fresh=True))

    # pragma: no mutate end

    def _poll_delay(
        self, eligible: list[Endpoint], fleet: Fleet, now: float, give_up_at: float
    ) -> float:
        """How long to wait before reading the fleet again.

        Until the first busy call is expected to end (measured call times), so a waiting
        caller does not read the table ten times a second for nothing; but every `poll`
        seconds once a call is due or overdue, so a freed slot is taken at once.
        """
        ends = [t for e in eligible for t in fleet.busy_until(e, now)]
        wait = min(ends) - now if ends else self._poll
        return max(self._poll, min(wait, MAX_POLL_SECONDS, max(0.0, give_up_at - now)))
