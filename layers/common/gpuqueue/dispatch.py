"""The dispatcher's domain logic: one queue message in, one task driven to its next state.

Idempotent on task_id: a duplicate delivery finds the task terminal (or held by a live
lease) and does nothing; the image key is deterministic, so a repeated run overwrites
the same object; every write after the claim is conditional on holding the lease.

Capacity: a GPU call happens only while holding one of the endpoint's slots (a lease in
the endpoints table). No free slot: wait briefly, then hand the message back without
spending an attempt. A failed call counts against the endpoint at once (its circuit opens
after `circuit_failure_threshold` in a row) and the task moves to another endpoint in the
same invocation when enough time is left for a full call.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from aws_lambda_powertools import Logger

from gpuqueue.balancer import Balancer, Candidate, Strategy, worth_taking
from gpuqueue.endpoint_registry import EndpointRegistry, Fleet
from gpuqueue.errors import GpuError, RetryLater
from gpuqueue.gpu_client import ImageGenerator
from gpuqueue.image_store import ImageStore
from gpuqueue.models import (
    Endpoint,
    EndpointProtocol,
    QueueMessage,
    SlotLease,
    Task,
    TaskKind,
    TaskStatus,
)
from gpuqueue.task_store import Claim, TaskStore

logger = Logger(child=True)

# Time kept back from the Lambda's remaining time for the writes after the GPU call.
SAFETY_MARGIN_SECONDS = 5.0
# Below this much budget a GPU call is not worth starting.
MIN_CALL_SECONDS = 1.0


# A waiting worker re-reads the fleet at least this often, whatever it expects.
MAX_POLL_SECONDS = 1.0
# How long a read of the queues' depth stays good enough for the tail decision.
BACKLOG_TTL_SECONDS = 1.0


class _HeldSlot:
    """A leased slot, released once: early after a good call (with its duration), or in
    the dispatcher's `finally` otherwise."""

    def __init__(self, registry: EndpointRegistry, lease: SlotLease) -> None:
        self._registry = registry
        self.lease = lease
        self._released = False

    def release(self, *, call_seconds: float | None = None) -> None:
        if not self._released:
            self._released = True
            self._registry.release_slot(self.lease, call_seconds=call_seconds)


class _Backlog:
    """The number of tasks waiting to start, read lazily and at most once a second."""

    def __init__(self, source: Callable[[], int] | None, clock: Callable[[], float]) -> None:
        self._source = source
        self._clock = clock
        self._value = 0
        self._read_at: float | None = None

    @property
    def known(self) -> bool:
        return self._source is not None

    def count(self) -> int:
        now = self._clock()
        if self._source is not None and (
            self._read_at is None or now - self._read_at >= BACKLOG_TTL_SECONDS
        ):
            self._value = self._source()
            self._read_at = now
        return self._value


class Outcome(StrEnum):
    DONE = "DONE"
    FAILED = "FAILED"
    RETRY = "RETRY"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class DispatchPolicy:
    task_timeout_seconds: float
    max_attempts: int
    health_max_age_seconds: float
    retry_base_delay_seconds: float = 2.0
    retry_max_delay_seconds: float = 60.0
    no_endpoint_delay_seconds: int = 10
    circuit_failure_threshold: int = 3
    slot_wait_seconds: float = 5.0
    slot_poll_seconds: float = 0.1
    no_slot_delay_seconds: int = 2

    def backoff_seconds(self, attempt: int, rng: random.Random) -> int:
        """Capped exponential backoff with jitter in [ceiling/2, ceiling], whole seconds up."""
        ceiling = min(
            self.retry_max_delay_seconds, self.retry_base_delay_seconds * 2 ** (attempt - 1)
        )
        return math.ceil(rng.uniform(ceiling / 2, ceiling))


class TaskDispatcher:
    def __init__(
        self,
        *,
        tasks: TaskStore,
        registry: EndpointRegistry,
        images: ImageStore,
        generators: Mapping[EndpointProtocol, ImageGenerator],
        policy: DispatchPolicy,
        balancer: Balancer | None = None,
        backlog: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._tasks = tasks
        self._registry = registry
        self._images = images
        self._generators = generators
        self._policy = policy
        self._balancer = balancer or Balancer()
        # Messages in the task queues (visible, delayed and in flight); lets least-loaded hold
        # a tail task back for a faster endpoint. Without it every free slot is taken.
        self._backlog = backlog
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets

    def dispatch(self, message: QueueMessage, *, remaining_seconds: Callable[[], float]) -> Outcome:
        """Drive one task; raises RetryLater when the message should come back later."""
        task = self._tasks.get(message.task_id)
        if task is None:
            logger.warning(
                "message for a task that does not exist", extra={"task_id": message.task_id}
            )
            return Outcome.SKIPPED
        if task.status.is_terminal:
            # Canceled before dispatch, or a duplicate delivery of finished work.
            return Outcome.SKIPPED
        now = self._clock()
        if (
            task.lease_until is not None
            and task.status is TaskStatus.RUNNING
            and task.lease_until >= now
        ):
            # Someone holds a live lease: come back when it would have expired.
            raise RetryLater(
                "task is running elsewhere",
                delay_seconds=int(task.lease_until - now) + 1,
                requeue=True,
            )
        if task.attempt >= self._policy.max_attempts:
            last_error = task.error or "the worker's lease expired"
            self._tasks.fail_exhausted(
                task, f"gave up after {task.attempt} attempts; last error: {last_error}"
            )
            return Outcome.FAILED
        tried = {task.endpoint_id} if task.endpoint_id and task.error else set()
        return self._run(task, tried, remaining_seconds)

    def _budget(self, remaining_seconds: Callable[[], float]) -> float:
        return min(self._policy.task_timeout_seconds, remaining_seconds() - SAFETY_MARGIN_SECONDS)

    def _run(self, task: Task, tried: set[str], remaining_seconds: Callable[[], float]) -> Outcome:
        claim: Claim | None = None
        last_error: str | None = None  # the failed attempt this invocation moves on from
        while True:
            budget = self._budget(remaining_seconds)
            if budget < MIN_CALL_SECONDS:
                if claim is not None:
                    self._tasks.release_for_retry(
                        claim, error=last_error or "ran out of time", endpoint_id=None
                    )
                raise RetryLater("not enough time left in this invocation", delay_seconds=0)
            lease_seconds = budget + SAFETY_MARGIN_SECONDS
            try:
                lease, endpoint = self._acquire_slot(task, tried, lease_seconds)
            except RetryLater:
                if claim is not None:  # a retry found no slot: give the task back, QUEUED
                    self._tasks.release_for_retry(
                        claim, error=last_error or "no free slot", endpoint_id=None
                    )
                raise
            slot = _HeldSlot(self._registry, lease)
            try:
                now = self._clock()
                if claim is None:
                    claim = self._tasks.claim(
                        task, lease_seconds=lease_seconds, now=now, endpoint_id=endpoint.endpoint_id
                    )
                else:
                    claim = self._tasks.next_attempt(
                        claim,
                        lease_seconds=lease_seconds,
                        now=now,
                        endpoint_id=endpoint.endpoint_id,
                        error=last_error,
                    )
                if claim is None:
                    return Outcome.SKIPPED  # another delivery won the race; it owns the task
                outcome, last_error = self._call(
                    claim,
                    endpoint,
                    slot,
                    budget=budget,
                    tried=tried,
                    remaining_seconds=remaining_seconds,
                )
            finally:
                slot.release()
            if outcome is not Outcome.RETRY:
                return outcome

    def _acquire_slot(
        self, task: Task, tried: set[str], lease_seconds: float
    ) -> tuple[SlotLease, Endpoint]:
        """Lease a slot on the best endpoint; wait briefly for one; else hand the task back."""
        give_up_at = self._clock() + self._policy.slot_wait_seconds
        backlog = _Backlog(self._backlog, self._clock)
        while True:
            now = self._clock()
            fleet = self._registry.fleet(TaskKind.IMAGE)
            routable = fleet.routable(now, self._policy.health_max_age_seconds)
            if not routable:
                # Not the task's fault: wait without spending an attempt.
                raise RetryLater(
                    "no healthy image endpoint",
                    delay_seconds=self._policy.no_endpoint_delay_seconds,
                    requeue=True,
                )
            # An endpoint that just failed this task is used again only if it is the last one
            # standing: otherwise wait for a slot elsewhere.
            untried = [e for e in routable if e.endpoint_id not in tried]
            eligible = untried or routable
            candidates = [
                Candidate(
                    endpoint=e,
                    in_flight=fleet.in_flight(e.endpoint_id, now),
                    free_slots=n,
                    service_seconds=fleet.service_seconds(e),
                )
                for e in eligible
                if (n := len(fleet.free_slots(e, now)))
            ]
            ordered = self._balancer.order(
                candidates, routable=routable, user_id=task.user_id, avoid=tried
            )
            for candidate in ordered:
                if not self._worth_taking(candidate, eligible, fleet, now, backlog):
                    continue
                for slot in fleet.free_slots(candidate.endpoint, now):
                    lease = self._registry.take_slot(
                        candidate.endpoint,
                        slot,
                        task_id=task.task_id,
                        lease_seconds=lease_seconds,
                        now=now,
                    )
                    if lease is not None:
                        return lease, candidate.endpoint
            if self._clock() >= give_up_at:
                raise RetryLater(
                    "every GPU slot is busy",
                    delay_seconds=self._policy.no_slot_delay_seconds,
                    requeue=True,
                )
            self._sleep(self._poll_delay(eligible, fleet, now, give_up_at))

    def _worth_taking(
        self,
        candidate: Candidate,
        eligible: list[Endpoint],
        fleet: Fleet,
        now: float,
        backlog: _Backlog,
    ) -> bool:
        """Least-loaded only: skip a slower endpoint when faster slots clear the backlog sooner."""
        if self._balancer.strategy is not Strategy.LEAST_LOADED or not backlog.known:
            return True
        service = candidate.service_seconds
        if service is None:
            return True
        others = [
            (free_at, other_service)
            for e in eligible
            if e.endpoint_id != candidate.endpoint.endpoint_id
            and (other_service := fleet.service_seconds(e)) is not None
            and other_service < service
            for free_at in fleet.slot_free_times(e, now)
        ]
        running = sum(fleet.in_flight(e.endpoint_id, now) for e in fleet.endpoints)

        def waiting() -> int:
            # Messages in the queues (visible, delayed or held) less those already running:
            # the tasks not started yet, this one included.
            return max(1, backlog.count() - running)

        return worth_taking(now + service, others, waiting)

    def _poll_delay(
        self, eligible: list[Endpoint], fleet: Fleet, now: float, give_up_at: float
    ) -> float:
        """Sleep until a slot is expected to free (measured call times), within bounds, so
        a waiting worker does not poll the table ten times a second for nothing."""
        poll = self._policy.slot_poll_seconds
        expected = [t for e in eligible for t in fleet.slot_free_times(e, now) if t > now]
        wait = min(expected) - now if expected else poll
        return max(poll, min(wait, MAX_POLL_SECONDS, max(0.0, give_up_at - now)))

    def _call(
        self,
        claim: Claim,
        endpoint: Endpoint,
        slot: _HeldSlot,
        *,
        budget: float,
        tried: set[str],
        remaining_seconds: Callable[[], float],
    ) -> tuple[Outcome, str | None]:
        """One GPU call; RETRY comes with the error the next attempt records."""
        task = claim.task
        attempt = task.attempt
        log = {"task_id": task.task_id, "endpoint_id": endpoint.endpoint_id, "attempt": attempt}
        logger.info("dispatching", extra=log)
        generator = self._generators[endpoint.protocol]
        started = self._clock()
        try:
            png = generator.generate(endpoint, task, timeout_seconds=budget)
        except GpuError as error:
            reason = f"attempt {attempt} on {endpoint.endpoint_id}: {error}"
            tried.add(endpoint.endpoint_id)
            opened = self._registry.record_dispatch_failure(
                endpoint.endpoint_id,
                threshold=self._policy.circuit_failure_threshold,
                now=self._clock(),
            )
            if opened:
                logger.warning("circuit opened", extra=log)
            if not error.retryable or attempt >= self._policy.max_attempts:
                self._tasks.fail(claim, error=reason, endpoint_id=endpoint.endpoint_id)
                logger.warning("task failed", extra={**log, "error": reason})
                return Outcome.FAILED, reason
            # Another full call must fit in what is left of this invocation.
            if remaining_seconds() - SAFETY_MARGIN_SECONDS >= self._policy.task_timeout_seconds:
                # Straight to another endpoint, in this invocation.
                logger.warning("retrying on another endpoint", extra={**log, "error": reason})
                return Outcome.RETRY, reason
            self._tasks.release_for_retry(claim, error=reason, endpoint_id=endpoint.endpoint_id)
            logger.warning("task will be retried", extra={**log, "error": reason})
            raise RetryLater(
                reason, delay_seconds=self._policy.backoff_seconds(attempt, self._rng)
            ) from error

        # The GPU is free once it has answered: hand the slot on before storing the image.
        slot.release(call_seconds=self._clock() - started)
        key = self._images.put_png(task.task_id, png)
        self._registry.record_dispatch_success(endpoint)
        if not self._tasks.complete(claim, result_key=key, endpoint_id=endpoint.endpoint_id):
            # Our lease was taken over; the new holder writes the same key, so nothing is lost.
            logger.warning("lease lost before completion", extra=log)
            return Outcome.SKIPPED, None
        logger.info("task done", extra=log)
        return Outcome.DONE, None
