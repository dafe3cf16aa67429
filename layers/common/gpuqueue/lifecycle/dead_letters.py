"""What a dead-lettered task message means: the task ends FAILED with the reason recorded.

A message reaches a dead-letter queue after maxReceiveCount receives without being deleted:
the dispatcher crashed or timed out on it every time. The task would otherwise stay QUEUED or
RUNNING for good, holding a share of its owner's active tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from gpuqueue.models import QueueMessage
from gpuqueue.store.task_store import TaskStore


class StillRunning(Exception):
    """A worker holds a live lease on the task: look at the message again later."""


class Settled(StrEnum):
    FAILED = "failed"  # the task was ended here
    ALREADY_ENDED = "already_ended"  # it had reached a final state anyway
    UNKNOWN = "unknown"  # no such task (expired by TTL, or never written)


class DeadLetters:
    def __init__(self, tasks: TaskStore, *, clock: Callable[[], float] = time.time) -> None:
        self._tasks = tasks
        self._clock = clock

    def settle(self, message: QueueMessage, *, lane: str) -> Settled:
        task = self._tasks.get(message.task_id)
        if task is None:
            return Settled.UNKNOWN
        if task.status.is_terminal:
            return Settled.ALREADY_ENDED
        # maxReceiveCount deliveries ended with no outcome written (crashes or timeouts).
        error = f"dead-lettered: the {lane} queue delivered the task repeatedly with no outcome"
        if task.error:
            error += f"; last error: {task.error}"
        if self._tasks.fail_dead_lettered(task.task_id, error, now=self._clock()):
            return Settled.FAILED
        current = self._tasks.get(message.task_id)
        if current is None:
            return Settled.UNKNOWN
        if current.status.is_terminal:
            return Settled.ALREADY_ENDED
        raise StillRunning(f"task {message.task_id} is {current.status.value} under a live lease")
