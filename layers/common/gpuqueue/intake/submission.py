"""Accepting a task: lane and capacity checks, the owner's share, the task row, then the
queue message."""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import timedelta
from typing import TypeVar

from aws_lambda_powertools import Logger

from gpuqueue import aws_clients
from gpuqueue.errors import (
    Forbidden,
    InvalidInput,
    QueueFull,
    RateLimited,
    ServiceUnavailable,
    StoreError,
)
from gpuqueue.intake.active_share import ActiveTaskShare
from gpuqueue.intake.intake_metrics import IntakeMetrics
from gpuqueue.intake.queue_position import LaneFull, QueuePositions
from gpuqueue.intake.rate_limiter import Probation, RateDecision, RateLimiter
from gpuqueue.models import (
    ImageRequest,
    Priority,
    QueueMessage,
    SpeechInput,
    Task,
    TaskStatus,
    WebhookEvent,
)
from gpuqueue.notify.webhook_target import Resolver, check_webhook_url, resolve_host
from gpuqueue.settings import SubmitLimitsSettings
from gpuqueue.store.limits_rows import LimitsRow
from gpuqueue.store.task_ids import new_task_id
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue.store.task_store import TaskStore

logger = Logger(child=True)
T = TypeVar("T")

# Cognito groups whose members may use the high-priority lane.
PRIORITY_GROUPS = frozenset({"vip", "admin"})
# An announced upload may still be arriving this long after its URL expired (a PUT that
# started just in time); only then does it stop holding a share.
UPLOAD_GRACE_SECONDS = 300


def may_use_priority_lane(groups: Collection[str]) -> bool:
    return not PRIORITY_GROUPS.isdisjoint(groups)


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
        share: ActiveTaskShare | None = None,
        priority_queue: TaskQueue | None = None,
        webhook_allow_loopback: bool = False,
        resolve: Resolver = resolve_host,
        positions: QueuePositions | None = None,  # the lanes: positions, and the capacity bound
        metrics: IntakeMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._positions = positions
        self._webhook_allow_loopback = webhook_allow_loopback
        self._resolve = resolve
        self._limiter = limiter
        self._share = share
        self._tasks = tasks
        self._lanes = {Priority.NORMAL: queue}
        if priority_queue is not None:
            self._lanes[Priority.HIGH] = priority_queue
        self._capacity = capacity
        self._retry_after = retry_after_seconds
        self._queue_ttl = default_queue_ttl_seconds

    @classmethod
    def from_settings(
        cls, settings: SubmitLimitsSettings, *, metrics: IntakeMetrics | None = None
    ) -> SubmissionService:
        """The service as a submit path's Lambda builds it, from its environment."""
        dynamodb = aws_clients.dynamodb()
        tasks = TaskStore(
            dynamodb.Table(settings.tasks_table),
            retention=timedelta(days=settings.task_retention_days),
        )
        limits = dynamodb.Table(settings.limits_table)
        return cls(
            tasks=tasks,
            queue=TaskQueue(aws_clients.sqs(), settings.task_queue_url),
            priority_queue=(
                TaskQueue(aws_clients.sqs(), settings.priority_queue_url)
                if settings.priority_queue_url
                else None
            ),
            capacity=settings.queue_capacity,
            retry_after_seconds=settings.queue_full_retry_after_seconds,
            default_queue_ttl_seconds=settings.queue_ttl_seconds,
            limiter=RateLimiter(
                limits,
                rate_per_second=settings.submit_rate_per_second,
                burst=settings.submit_burst,
                rows=LimitsRow.ACTIVE_SHARE,  # one row per user: the tat beside the shares
            ),
            share=ActiveTaskShare(
                limits,
                limit=settings.active_task_limit,
                find_inactive=tasks.inactive_among,
                probation=Probation(
                    limit=settings.new_account_active_tasks,
                    seconds=settings.new_account_hours * 3600,
                ),
            ),
            webhook_allow_loopback=settings.webhook_allow_loopback,
            positions=QueuePositions(limits),
            metrics=metrics,
        )

    @property
    def share(self) -> ActiveTaskShare | None:
        return self._share

    @property
    def tasks(self) -> TaskStore:
        return self._tasks

    def rate_headers(self, owner: str) -> dict[str, str]:
        """The X-RateLimit-* headers of the owner's bucket as this container last saw it
        (its own take, just made): no request."""
        if self._limiter is None:
            return {}
        return self._headers(self._limiter.headers_hint(owner))

    @staticmethod
    def _headers(decision: RateDecision) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(decision.limit),
            "X-RateLimit-Remaining": str(decision.remaining),
            "X-RateLimit-Reset": str(decision.reset_seconds),
        }

    def _admit(self, owner: str, task_id: str) -> None:
        """Take a token from the owner's bucket and one of their active-task shares, in one
        write (the limiter's tat lives in the share's row): RateLimited or ActiveTaskLimit
        when either is spent. Their table unreachable: ServiceUnavailable (the shares could
        not be counted, so nothing may be admitted)."""
        assert self._limiter is not None or self._share is not None
        try:
            if self._share is not None:
                decision = self._share.take(owner, task_id, rate=self._limiter)
            else:
                assert self._limiter is not None
                decision = self._limiter.take(owner)
        except StoreError as error:
            logger.exception("limits table unavailable", extra={"task_id": task_id})
            raise ServiceUnavailable(
                "the limits store is unavailable; the task was not accepted",
                retry_after_seconds=self._retry_after,
            ) from error
        if decision is None or decision.allowed:
            return
        assert self._limiter is not None
        raise RateLimited(
            f"rate limited: at most {decision.limit} submits in a burst, then "
            f"{self._limiter.rate_per_second:g} a second; retry in "
            f"{decision.retry_after_seconds} s",
            retry_after_seconds=decision.retry_after_seconds,
            headers=self._headers(decision),
        )

    def _lane(self, priority: Priority, groups: Collection[str]) -> TaskQueue:
        if priority is Priority.HIGH:
            if not may_use_priority_lane(groups):
                raise Forbidden(
                    "priority: only members of the vip or admin group may ask for high priority",
                    field="priority",
                )
            if Priority.HIGH not in self._lanes:
                raise InvalidInput("priority: this stack has no priority lane", field="priority")
        return self._lanes[priority]

    def _check_capacity(self, priority: Priority) -> None:
        """Refuse at once a task that could not be queued now: one announced to be queued
        later (its upload), whose ticket is taken then, when a landed upload is always
        queued."""
        if self._positions is None:
            return
        waiting = self._positions.waiting(priority)
        if waiting >= self._capacity:
            raise self._full(waiting)

    def _full(self, waiting: int) -> QueueFull:
        return QueueFull(
            f"queue is full ({waiting}/{self._capacity} tasks waiting); retry later",
            retry_after_seconds=self._retry_after,
        )

    def _with_share(self, owner: str, task_id: str, create: Callable[[], Task]) -> Task:
        """Create the task under a rate token and one of the owner's active-task shares
        (RateLimited / ActiveTaskLimit when either is spent). The share is handed back if
        the task was never written."""
        if self._share is None and self._limiter is None:
            return create()
        try:
            self._admit(owner, task_id)
        except RateLimited as refusal:  # ActiveTaskLimit is one too
            if self._metrics is not None:
                self._metrics.refused(refusal)
            raise
        if self._share is None:
            return create()
        try:
            return create()
        except StoreError as error:
            self._share.release(owner, task_id)
            logger.exception("task write failed", extra={"task_id": task_id})
            raise ServiceUnavailable(
                "the task store is unavailable; the task was not accepted",
                retry_after_seconds=self._retry_after,
            ) from error
        except BaseException:
            self._share.release(owner, task_id)
            raise

    def _check_webhook(self, url: str | None) -> None:
        if url is not None:
            check_webhook_url(
                url, allow_loopback=self._webhook_allow_loopback, resolve=self._resolve
            )

    def submit_image(
        self, owner: str, request: ImageRequest, *, groups: Collection[str] = ()
    ) -> Task:
        self._check_webhook(request.webhook_url)
        self._lane(request.priority, groups)
        task_id = new_task_id()
        task = self._with_share(
            owner,
            task_id,
            lambda: self._with_ticket(
                request.priority,
                capacity=self._capacity,
                queue=lambda ticket: self._tasks.create_image_task(
                    owner,
                    request,
                    queue_ttl_seconds=self._queue_ttl,
                    task_id=task_id,
                    ticket=ticket,
                ),
            ),
        )
        self._enqueue(task)
        self._count_submitted()
        return task

    def _with_ticket(
        self, lane: Priority, *, queue: Callable[[int | None], T], capacity: int | None = None
    ) -> T:
        """Queue the task under a ticket of its lane's waiting line (its queue position; with
        `capacity`, QueueFull when the line is full); a ticket left unused counts as having
        left the line, so later positions stay right."""
        if self._positions is None:
            return queue(None)
        try:
            ticket = self._positions.take_ticket(lane, capacity=capacity)
        except LaneFull as full:
            raise self._full(full.waiting) from full
        try:
            task = queue(ticket)
        except BaseException:
            self._positions.left(lane)
            raise
        if task is None:
            self._positions.left(lane)
        return task

    def submit_speech_upload(
        self,
        owner: str,
        speech: SpeechInput,
        *,
        prompt: str | None,
        task_id: str,
        upload_url_ttl_seconds: int,
        queue_ttl_seconds: int | None = None,
        priority: Priority = Priority.NORMAL,
        groups: Collection[str] = (),
        webhook_url: str | None = None,
        webhook_events: list[WebhookEvent] | None = None,
    ) -> Task:
        """A long-audio task: AWAITING_UPLOAD now, queued when the upload lands. It holds a
        share of the owner's active tasks from now (it will be queued)."""
        self._check_webhook(webhook_url)
        self._lane(priority, groups)
        self._check_capacity(priority)
        return self._with_share(
            owner,
            task_id,
            lambda: self._tasks.create_speech_task(
                owner,
                speech,
                prompt=prompt,
                task_id=task_id,
                queue_ttl_seconds=queue_ttl_seconds or self._queue_ttl,
                upload_window_seconds=upload_url_ttl_seconds + UPLOAD_GRACE_SECONDS,
                priority=priority,
                webhook_url=webhook_url,
                webhook_events=webhook_events,
            ),
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
            self._count_submitted()
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
        queued = self._with_ticket(
            task.priority, queue=lambda ticket: self._tasks.mark_uploaded(task, ticket=ticket)
        )
        if queued is None:
            return None  # canceled meanwhile, or another event got there first
        self._enqueue(queued)
        self._count_submitted()
        return queued

    def _count_submitted(self) -> None:
        if self._metrics is not None:
            self._metrics.submitted()

    def _enqueue(self, task: Task) -> None:
        # A lane this stack no longer has: the normal one (no task is ever stranded).
        lane = self._lanes.get(task.priority, self._lanes[Priority.NORMAL])
        try:
            lane.send(QueueMessage(task_id=task.task_id, kind=task.kind, priority=task.priority))
        except StoreError as error:
            # No orphan: a task the queue never got must not sit QUEUED forever.
            logger.exception("queue send failed", extra={"task_id": task.task_id})
            self._tasks.fail_unqueued(task.task_id, f"queue unavailable: {error.sdk_error}")
            if self._share is not None:
                self._share.release(task.user_id, task.task_id)
            raise ServiceUnavailable(
                "the task queue is unavailable; the task was not accepted",
                retry_after_seconds=self._retry_after,
            ) from error
