"""The dispatcher's domain logic: one queue message in, one task driven to its next state.

Generic over task kinds: a `Job` per kind (image generation, transcription) prepares the
input, makes the one GPU call and stores the output; states, leases, retries and slots are
the same for all.

Idempotent on task_id: a duplicate delivery finds the task terminal (or held by a live
lease) and does nothing; result keys are deterministic, so a repeated run overwrites
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
from typing import Any

from aws_lambda_powertools import Logger

from gpuqueue.balancer import Balancer
from gpuqueue.dispatch_metrics import DispatchObserver
from gpuqueue.endpoint_registry import EndpointRegistry
from gpuqueue.errors import GpuError, GpuTimeout, RetryLater
from gpuqueue.jobs import InvalidTaskInput, Job
from gpuqueue.models import QueueMessage, Task, TaskKind, TaskStatus
from gpuqueue.slot_broker import HeldSlot, NoFreeSlot, NoRoutableEndpoint, SlotBroker, SlotRequest
from gpuqueue.task_store import Claim, TaskStore

logger = Logger(child=True)

# Time kept back from the Lambda's remaining time for the writes after the GPU call.
SAFETY_MARGIN_SECONDS = 5.0
# Below this much budget a GPU call is not worth starting.
MIN_CALL_SECONDS = 1.0


@dataclass(frozen=True)
class _Work:
    job: Job
    job_input: Any


class Outcome(StrEnum):
    DONE = "DONE"
    FAILED = "FAILED"
    RETRY = "RETRY"
    SKIPPED = "SKIPPED"
    EXPIRED = "EXPIRED"


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
    # Slots of a kind high-priority tasks may hold at once; None: no cap.
    priority_lane_slots: int | None = None

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
        jobs: Mapping[TaskKind, Job],
        policy: DispatchPolicy,
        balancer: Balancer | None = None,
        backlog: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        observer: DispatchObserver | None = None,
    ) -> None:
        self._observer = observer
        self._tasks = tasks
        self._registry = registry
        self._jobs = jobs
        self._policy = policy
        self._slots = SlotBroker(
            registry,
            health_max_age_seconds=policy.health_max_age_seconds,
            balancer=balancer,
            poll_seconds=policy.slot_poll_seconds,
            backlog=backlog,
            priority_lane_slots=policy.priority_lane_slots,
            clock=clock,
            sleep=sleep,
        )
        self._clock = clock
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
            task.status is TaskStatus.QUEUED
            and task.attempt == 0
            and task.queue_deadline is not None
            and now > task.queue_deadline
        ):
            # Never started in time: end it without touching a GPU.
            self._tasks.expire(
                task, f"not started within its queue deadline ({task.queue_ttl_seconds} s)"
            )
            logger.info("task expired in the queue", extra={"task_id": task.task_id})
            return Outcome.EXPIRED
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
            self._tasks.fail_unclaimed(
                task, f"gave up after {task.attempt} attempts; last error: {last_error}"
            )
            return Outcome.FAILED
        job = self._jobs.get(task.kind)
        if job is None:
            self._tasks.fail_unclaimed(task, f"no worker handles {task.kind.value} tasks")
            return Outcome.FAILED
        try:
            job_input = job.prepare(task)
        except InvalidTaskInput as error:
            self._tasks.fail_unclaimed(task, str(error))
            logger.warning("task input unusable", extra={"task_id": task.task_id})
            return Outcome.FAILED
        tried = {task.endpoint_id} if task.endpoint_id and task.error else set()
        return self._run(task, _Work(job, job_input), tried, remaining_seconds)

    def _budget(self, remaining_seconds: Callable[[], float]) -> float:
        return min(self._policy.task_timeout_seconds, remaining_seconds() - SAFETY_MARGIN_SECONDS)

    def _run(
        self, task: Task, work: _Work, tried: set[str], remaining_seconds: Callable[[], float]
    ) -> Outcome:
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
                slot = self._acquire_slot(task, tried, lease_seconds)
            except RetryLater:
                if claim is not None:  # a retry found no slot: give the task back, QUEUED
                    self._tasks.release_for_retry(
                        claim, error=last_error or "no free slot", endpoint_id=None
                    )
                raise
            endpoint = slot.endpoint
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
                if self._observer is not None:
                    self._observer.task_started(claim.task, at=now)
                outcome, last_error = self._call(
                    claim,
                    work,
                    slot,
                    budget=budget,
                    tried=tried,
                    remaining_seconds=remaining_seconds,
                )
            finally:
                slot.release()
            if outcome is not Outcome.RETRY:
                return outcome

    def _acquire_slot(self, task: Task, tried: set[str], lease_seconds: float) -> HeldSlot:
        """Lease a slot on the best endpoint; wait briefly for one; else hand the task back.

        Either way the wait is not the task's fault, so it costs no attempt.
        """
        request = SlotRequest(
            kind=task.kind,
            task_id=task.task_id,
            user_id=task.user_id,
            lease_seconds=lease_seconds,
            wait_seconds=self._policy.slot_wait_seconds,
            tried=tried,
            priority=task.priority,
        )
        try:
            return self._slots.acquire(request)
        except NoRoutableEndpoint as error:
            raise RetryLater(
                str(error), delay_seconds=self._policy.no_endpoint_delay_seconds, requeue=True
            ) from error
        except NoFreeSlot as error:
            raise RetryLater(
                str(error), delay_seconds=self._policy.no_slot_delay_seconds, requeue=True
            ) from error

    def _call(
        self,
        claim: Claim,
        work: _Work,
        slot: HeldSlot,
        *,
        budget: float,
        tried: set[str],
        remaining_seconds: Callable[[], float],
    ) -> tuple[Outcome, str | None]:
        """One GPU call; RETRY comes with the error the next attempt records."""
        task = claim.task
        endpoint = slot.endpoint
        attempt = task.attempt
        log = {"task_id": task.task_id, "endpoint_id": endpoint.endpoint_id, "attempt": attempt}
        logger.info("dispatching", extra=log)
        started = self._clock()
        try:
            output = work.job.run(endpoint, task, work.job_input, timeout_seconds=budget)
        except GpuError as error:
            reason = f"attempt {attempt} on {endpoint.endpoint_id}: {error}"
            tried.add(endpoint.endpoint_id)
            if isinstance(error, GpuTimeout):
                # The GPU may still be generating: its slot stays taken until the lease ends
                # (the margin past the timeout), so the endpoint never gets more than its
                # capacity of calls.
                slot.keep_until_lease_ends()
            if self._observer is not None:
                self._observer.gpu_call_failed(
                    task, endpoint_id=endpoint.endpoint_id, retryable=error.retryable
                )
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
        call_seconds = self._clock() - started
        slot.release(call_seconds=call_seconds)
        completion = work.job.store(task, output)
        self._registry.record_dispatch_success(endpoint)
        if not self._tasks.complete(
            claim,
            result_key=completion.result_key,
            endpoint_id=endpoint.endpoint_id,
            fields=completion.fields,
        ):
            # Our lease was taken over; the new holder writes the same key, so nothing is lost.
            logger.warning("lease lost before completion", extra=log)
            return Outcome.SKIPPED, None
        logger.info("task done", extra=log)
        if self._observer is not None:
            self._observer.task_done(task, call_seconds=call_seconds, at=self._clock())
        return Outcome.DONE, None
