"""Accepting a task: capacity check, the task row, then the queue message."""

from __future__ import annotations

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from gpuqueue.errors import QueueFull, ServiceUnavailable
from gpuqueue.models import ImageRequest, QueueMessage, Task, TaskKind
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
    ) -> None:
        self._tasks = tasks
        self._queue = queue
        self._capacity = capacity
        self._retry_after = retry_after_seconds

    def submit_image(self, owner: str, request: ImageRequest) -> Task:
        queued = self._queue.depth().queued
        if queued >= self._capacity:
            raise QueueFull(
                f"queue is full ({queued}/{self._capacity} tasks waiting); retry later",
                retry_after_seconds=self._retry_after,
            )
        task = self._tasks.create_image_task(owner, request)
        try:
            self._queue.send(QueueMessage(task_id=task.task_id, kind=TaskKind.IMAGE))
        except (ClientError, BotoCoreError) as error:
            # No orphan: a task the queue never got must not sit QUEUED forever.
            logger.exception("queue send failed", extra={"task_id": task.task_id})
            self._tasks.fail_unqueued(task.task_id, f"queue unavailable: {type(error).__name__}")
            raise ServiceUnavailable(
                "the task queue is unavailable; the task was not accepted",
                retry_after_seconds=self._retry_after,
            ) from error
        return task
