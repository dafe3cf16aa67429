"""The dispatcher's domain logic: one queue message in, one task driven to its next state.

Idempotent on task_id: a duplicate delivery finds the task terminal (or held by a live
lease) and does nothing; the image key is deterministic, so a repeated run overwrites
the same object; every write after the claim is conditional on holding the lease.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from aws_lambda_powertools import Logger

from gpuqueue.balancer import RoundRobinBalancer
from gpuqueue.endpoint_registry import EndpointRegistry
from gpuqueue.errors import GpuError, RetryLater
from gpuqueue.gpu_client import ImageGenerator
from gpuqueue.image_store import ImageStore
from gpuqueue.models import QueueMessage, TaskKind, TaskStatus
from gpuqueue.task_store import TaskStore

logger = Logger(child=True)

# Time kept back from the Lambda's remaining time for the writes after the GPU call.
SAFETY_MARGIN_SECONDS = 5.0
# Below this much budget a GPU call is not worth starting.
MIN_CALL_SECONDS = 1.0


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
        generator: ImageGenerator,
        policy: DispatchPolicy,
        balancer: RoundRobinBalancer | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._tasks = tasks
        self._registry = registry
        self._images = images
        self._generator = generator
        self._policy = policy
        self._balancer = balancer or RoundRobinBalancer()
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
        if task.status is TaskStatus.RUNNING and (task.lease_until or 0) >= now:
            # Someone holds a live lease: come back when it would have expired.
            raise RetryLater(
                "task is running elsewhere",
                delay_seconds=int((task.lease_until or now) - now) + 1,
                requeue=True,
            )
        if task.attempt >= self._policy.max_attempts:
            last_error = task.error or "the worker's lease expired"
            self._tasks.fail_exhausted(
                task, f"gave up after {task.attempt} attempts; last error: {last_error}"
            )
            return Outcome.FAILED

        endpoints = self._registry.routable(
            TaskKind.IMAGE, max_age_seconds=self._policy.health_max_age_seconds, now=now
        )
        avoid = {task.endpoint_id} if task.endpoint_id and task.error else set()
        endpoint = self._balancer.pick_endpoint(endpoints, avoid=avoid)
        if endpoint is None:
            # Not the task's fault: wait without spending an attempt.
            raise RetryLater(
                "no healthy image endpoint",
                delay_seconds=self._policy.no_endpoint_delay_seconds,
                requeue=True,
            )

        budget = min(self._policy.task_timeout_seconds, remaining_seconds() - SAFETY_MARGIN_SECONDS)
        if budget < MIN_CALL_SECONDS:
            raise RetryLater("not enough time left in this invocation", delay_seconds=0)
        claim = self._tasks.claim(task, lease_seconds=budget + SAFETY_MARGIN_SECONDS, now=now)
        if claim is None:
            return Outcome.SKIPPED  # another delivery won the race; it owns the task now
        attempt = claim.task.attempt
        log = {"task_id": task.task_id, "endpoint_id": endpoint.endpoint_id, "attempt": attempt}
        logger.info("dispatching", extra=log)

        try:
            png = self._generator.generate(endpoint, claim.task, timeout_seconds=budget)
        except GpuError as error:
            reason = f"attempt {attempt} on {endpoint.endpoint_id}: {error}"
            if not error.retryable or attempt >= self._policy.max_attempts:
                self._tasks.fail(claim, error=reason, endpoint_id=endpoint.endpoint_id)
                logger.warning("task failed", extra={**log, "error": reason})
                return Outcome.FAILED
            self._tasks.release_for_retry(claim, error=reason, endpoint_id=endpoint.endpoint_id)
            logger.warning("task will be retried", extra={**log, "error": reason})
            raise RetryLater(
                reason, delay_seconds=self._policy.backoff_seconds(attempt, self._rng)
            ) from error

        key = self._images.put_png(task.task_id, png)
        if not self._tasks.complete(claim, result_key=key, endpoint_id=endpoint.endpoint_id):
            # Our lease was taken over; the new holder writes the same key, so nothing is lost.
            logger.warning("lease lost before completion", extra=log)
            return Outcome.SKIPPED
        logger.info("task done", extra=log)
        return Outcome.DONE
