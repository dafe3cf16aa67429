"""The reaper: nothing stays stuck when a process dies between two steps.

Runs on a schedule and looks only at open tasks that are overdue, through the tasks table's
sparse `by-reap` index (task_store.py):

- QUEUED for longer than `requeue_after_seconds` without starting: its message may never
  have been sent (a crash between the task write and the send) or may be lost. Its message
  is re-sent. That is safe whether or not the first one still exists, because the
  dispatcher claims a task with a conditional write: a second message for the same task is
  skipped. Each re-send doubles the wait before the next, so a task merely waiting in a deep
  queue costs a handful of cheap duplicates, not a flood. A task past its queue deadline is
  ended EXPIRED instead (the dispatcher would do the same, without touching a GPU).
- RUNNING with a lease that ended more than `lease_grace_seconds` ago: its invocation died.
  SQS would bring the message back only after its visibility timeout (18 min); the reaper
  puts the task back in the queue now, or ends it FAILED once its attempts are used up.
- AWAITING_UPLOAD past its upload window: the audio never came; EXPIRED.

What it may do per state is gpuqueue.task_states' REAPER_TRANSITIONS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aws_lambda_powertools import Logger

from gpuqueue.models import Priority, QueueMessage, Task, TaskStatus
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue.store.task_store import TaskStore
from gpuqueue.task_states import REAP_STATE, REAPER_TRANSITIONS

logger = Logger(child=True)


@dataclass(frozen=True)
class ReaperPolicy:
    max_attempts: int
    requeue_after_seconds: float = 900.0
    requeue_backoff_cap_seconds: float = 3600.0
    lease_grace_seconds: float = 60.0
    upload_grace_seconds: float = 300.0  # as submission.UPLOAD_GRACE_SECONDS
    max_tasks_per_state: int = 200  # per run; the next run takes the rest

    def overdue_after(self, status: TaskStatus) -> float:
        """How long after its reap time a task in the open state `status` is overdue."""
        return {
            TaskStatus.RUNNING: self.lease_grace_seconds,
            TaskStatus.QUEUED: self.requeue_after_seconds,
            TaskStatus.AWAITING_UPLOAD: self.upload_grace_seconds,
        }[status]

    def wait_after_resend(self, resends: int) -> float:
        """How long after its `resends`-th re-send a still-QUEUED task is re-sent again:
        the first wait doubled each time, capped."""
        doubled: float = self.requeue_after_seconds * 2.0 ** max(resends, 0)
        return min(self.requeue_backoff_cap_seconds, doubled)


@dataclass
class ReapReport:
    resent: list[str] = field(default_factory=list)  # QUEUED, message sent again
    requeued: list[str] = field(default_factory=list)  # RUNNING, worker lost -> QUEUED
    failed: list[str] = field(default_factory=list)  # RUNNING, worker lost, no attempt left
    expired: list[str] = field(default_factory=list)  # queue deadline or upload window passed

    @property
    def total(self) -> int:
        return len(self.resent) + len(self.requeued) + len(self.failed) + len(self.expired)

    def summary(self) -> dict[str, int]:
        return {
            "resent": len(self.resent),
            "requeued": len(self.requeued),
            "failed": len(self.failed),
            "expired": len(self.expired),
        }


class Reaper:
    def __init__(
        self,
        *,
        tasks: TaskStore,
        lanes: Mapping[Priority, TaskQueue],
        policy: ReaperPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tasks = tasks
        self._lanes = lanes
        self._policy = policy
        self._clock = clock

    def run(self) -> ReapReport:
        report = ReapReport()
        now = self._clock()
        policy = self._policy
        for status in REAPER_TRANSITIONS:  # every open state
            before = now - policy.overdue_after(status)
            for task_id in self._tasks.due(
                REAP_STATE[status], before=before, limit=policy.max_tasks_per_state
            ):
                task = self._tasks.get(task_id)
                if task is None:
                    continue
                self._reap(task, now, report)
        return report

    def _reap(self, task: Task, now: float, report: ReapReport) -> None:
        if task.status is TaskStatus.RUNNING:
            self._reap_running(task, now, report)
        elif task.status is TaskStatus.QUEUED:
            self._reap_queued(task, now, report)
        elif task.status is TaskStatus.AWAITING_UPLOAD and self._tasks.expire_upload(task.task_id):
            report.expired.append(task.task_id)
        # A final state: the index was read before the task ended; nothing to do.

    def _reap_running(self, task: Task, now: float, report: ReapReport) -> None:
        if task.lease_until is None or task.lease_until >= now - self._policy.lease_grace_seconds:
            return  # re-claimed since the index was read
        if task.attempt >= self._policy.max_attempts:
            error = f"the worker was lost during attempt {task.attempt} (its lease expired)"
            if task.error:
                error += f"; last error: {task.error}"
            if self._tasks.fail_abandoned(task, now=now, error=error):
                report.failed.append(task.task_id)
                logger.warning("lost task failed", extra={"task_id": task.task_id})
            return
        requeued = self._tasks.requeue_abandoned(
            task,
            now=now,
            error=f"the worker was lost during attempt {task.attempt} (its lease expired)",
        )
        if requeued is None:
            return
        # Written QUEUED first: if this send is lost too, the next run finds it QUEUED.
        self._send(requeued)
        report.requeued.append(task.task_id)
        logger.warning("lost task requeued", extra={"task_id": task.task_id})

    def _reap_queued(self, task: Task, now: float, report: ReapReport) -> None:
        if task.reap_at is None:
            return
        if task.attempt == 0 and task.queue_deadline is not None and now > task.queue_deadline:
            if self._tasks.expire(
                task, f"not started within its queue deadline ({task.queue_ttl_seconds} s)"
            ):
                report.expired.append(task.task_id)
            return
        # reap_at counts from when it was queued: due again `wait` from now.
        wait = self._policy.wait_after_resend(task.resends + 1)
        due_again = now + wait - self._policy.requeue_after_seconds
        if not self._tasks.defer_resend(task.task_id, seen_reap_at=task.reap_at, until=due_again):
            return  # claimed or re-sent by someone else meanwhile
        self._send(task)
        report.resent.append(task.task_id)
        logger.warning(
            "queued task re-sent", extra={"task_id": task.task_id, "resends": task.resends + 1}
        )

    def _send(self, task: Task) -> None:
        lane = self._lanes.get(task.priority, self._lanes[Priority.NORMAL])
        lane.send(QueueMessage(task_id=task.task_id, kind=task.kind, priority=task.priority))
