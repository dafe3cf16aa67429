"""Accepting a task: capacity check, the task row, then the queue message."""

from __future__ import annotations

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from gpuqueue.errors import QueueFull, RateLimited, ServiceUnavailable
from gpuqueue.models import ImageRequest, QueueMessage, SpeechInput, Task, TaskStatus
from gpuqueue.rate_limiter import RateLimiter
from gpuqueue.task_queue import TaskQueue
from gpuqueue.task_store import TaskStore

logger = Logger(child=True)


class SubmissionService:
    def __init__(
        self,
        *,
        tasks: TaskStore,
        queue: TaskQueue,
        capacity: int,
        retry_after_seconds: int = 10,
        default_queue_ttl_seconds: int = 3600,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._limiter = limiter
        self._tasks = tasks
        self._queue = queue
        self._capacity = capacity
        self._retry_after = retry_after_seconds
        self._queue_ttl = default_queue_ttl_seconds

    def admit(self, owner: str) -> dict[str, str]:
        """Take one submit from the owner's token bucket: the X-RateLimit-* headers, or
        RateLimited. Without a limiter, or if its table cannot be read, the submit goes on
        (the API's stage throttling still guards): a limiter outage must not stop work."""
        if self._limiter is None:
            return {}
        try:
            decision = self._limiter.take(owner)
        except (ClientError, BotoCoreError):
            logger.exception("rate limiter unavailable; submit admitted")
            return {}
        headers = {
            "X-RateLimit-Limit": str(decision.limit),
            "X-RateLimit-Remaining": str(decision.remaining),
            "X-RateLimit-Reset": str(decision.reset_seconds),
        }
        if not decision.allowed:
            raise RateLimited(
                f"rate limited: at most {decision.limit} submits in a burst, then "
                f"{self._limiter.rate_per_second:g} a second; retry in "
                f"{decision.retry_after_seconds} s",
                retry_after_seconds=decision.retry_after_seconds,
                headers=headers,
            )
        return headers

    def _check_capacity(self) -> None:
        queued = self._queue.depth().queued
        if queued >= self._capacity:
            raise QueueFull(
                f"queue is full ({queued}/{self._capacity} tasks waiting); retry later",
                retry_after_seconds=self._retry_after,
            )

    def submit_image(self, owner: str, request: ImageRequest) -> Task:
        self._check_capacity()
        task = self._tasks.create_image_task(owner, request, queue_ttl_seconds=self._queue_ttl)
        self._enqueue(task)
        return task

    def submit_speech_upload(
        self,
        owner: str,
        speech: SpeechInput,
        *,
        prompt: str | None,
        task_id: str,
        queue_ttl_seconds: int | None = None,
    ) -> Task:
        """A long-audio task: AWAITING_UPLOAD now, queued when the upload lands."""
        self._check_capacity()
        return self._tasks.create_speech_task(
            owner,
            speech,
            prompt=prompt,
            task_id=task_id,
            queue_ttl_seconds=queue_ttl_seconds or self._queue_ttl,
        )

    def queue_uploaded(self, task_id: str, *, size_bytes: int, max_bytes: int) -> Task | None:
        """The audio landed: check it, then queue the task. None when nothing is to be done."""
        task = self._tasks.get(task_id)
        if task is None or task.speech is None:
            logger.warning("upload for an unknown task", extra={"task_id": task_id})
            return None
        if task.status is TaskStatus.QUEUED and task.attempt == 0:
            # A repeated event after a send that may have failed: send again; the
            # dispatcher is idempotent, so a duplicate message costs nothing.
            self._enqueue(task)
            return task
        if task.status is not TaskStatus.AWAITING_UPLOAD:
            return None
        if size_bytes != task.speech.size_bytes or size_bytes > max_bytes:
            self._tasks.fail_unclaimed(
                task,
                f"the upload is {size_bytes} bytes; {task.speech.size_bytes} were announced "
                f"(at most {max_bytes})",
            )
            return None
        queued = self._tasks.mark_uploaded(task)
        if queued is None:
            return None  # canceled meanwhile, or another event got there first
        self._enqueue(queued)
        return queued

    def _enqueue(self, task: Task) -> None:
        try:
            self._queue.send(QueueMessage(task_id=task.task_id, kind=task.kind))
        except (ClientError, BotoCoreError) as error:
            # No orphan: a task the queue never got must not sit QUEUED forever.
            logger.exception("queue send failed", extra={"task_id": task.task_id})
            self._tasks.fail_unqueued(task.task_id, f"queue unavailable: {type(error).__name__}")
            raise ServiceUnavailable(
                "the task queue is unavailable; the task was not accepted",
                retry_after_seconds=self._retry_after,
            ) from error
