"""A caller's own tasks, one call per route of TasksFunction: the task as the API shows it
(a QUEUED one with its queue position and ETA, estimates: gpuqueue.intake.queue_position),
`Prefer: wait` honoured, the list, cancel, webhook deliveries and the image's URL. Someone
else's task is answered as a missing one (TaskNotFound: 404, never 403)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gpuqueue.api.prefer_wait import WaitSeats, honour_prefer_wait
from gpuqueue.errors import TaskStateConflict
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.intake.queue_position import QueuePositions, estimate
from gpuqueue.models import Task, TaskStatus, TaskView, utc_now
from gpuqueue.notify.redelivery import Redeliveries, Redelivery
from gpuqueue.notify.webhook_delivery import as_log
from gpuqueue.store.image_store import ImageStore, check_image_kept
from gpuqueue.store.task_store import TaskStore


@dataclass(frozen=True)
class StatusAnswer:
    view: TaskView
    headers: dict[str, str]  # Preference-Applied, when a wait was honoured


@dataclass(frozen=True)
class ViewPage:
    views: list[TaskView]
    next_cursor: str | None


@dataclass(frozen=True)
class ImageLinks:
    """Where a DONE image task's PNG is served from, and for how long."""

    store: ImageStore
    url_ttl_seconds: int
    kept: timedelta  # the bucket's lifecycle rule (ImageRetentionDays)


class OwnerTasks:
    def __init__(
        self,
        tasks: TaskStore,
        *,
        images: ImageLinks,
        redeliveries: Redeliveries | None = None,  # None: the stack has no webhooks
        positions: QueuePositions | None = None,  # None: no positions (nor ETAs) shown
        fleet: EndpointRegistry | None = None,  # None: positions without ETAs
        health_max_age_seconds: float = 0.0,
        wait_seats: WaitSeats | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tasks = tasks
        self._images = images
        self._redeliveries = redeliveries
        self._positions = positions
        self._fleet = fleet
        self._health_max_age_seconds = health_max_age_seconds
        self._wait_seats = wait_seats
        self._clock = clock

    def status(
        self,
        task_id: str,
        owner: str,
        *,
        prefer: str | None,
        remaining_seconds: Callable[[], float],
    ) -> StatusAnswer:
        """The task; with `Prefer: wait=N`, once it is final or N seconds have passed."""

        def read() -> Task:
            return self._tasks.get_for_owner(task_id, owner)

        waited = honour_prefer_wait(
            prefer, read, remaining_seconds=remaining_seconds, seats=self._wait_seats
        )
        if waited is None:
            return StatusAnswer(self.view(read()), {})
        return StatusAnswer(self.view(waited.task), waited.headers)

    def view(self, task: Task) -> TaskView:
        """The task as the API shows it; a QUEUED task with its position and ETA."""
        shown = TaskView.of(task)
        if self._positions is None or task.status is not TaskStatus.QUEUED:
            return shown
        lane = self._positions.lane(task.priority)
        position = self._positions.position(task, lane)
        if position is None:
            return shown
        eta = None
        if self._fleet is not None:
            eta = estimate(
                position,
                self._fleet.fleet(task.kind),
                now=self._clock(),
                max_age_seconds=self._health_max_age_seconds,
                gap_seconds=lane.gap_seconds,
            ).eta_seconds
        return shown.model_copy(update={"queue_position": position, "eta_seconds": eta})

    def page(self, owner: str, *, limit: int, cursor: str | None) -> ViewPage:
        """The owner's tasks newest first (as stored: no positions in a list)."""
        page = self._tasks.list_for_owner(owner, limit=limit, cursor=cursor)
        return ViewPage([TaskView.of(t) for t in page.tasks], page.next_cursor)

    def cancel(self, task_id: str, owner: str) -> TaskView:
        """The task as it now stands: CANCELED, or still RUNNING with its cancel requested
        (its GPU is told to stop; TaskStore.cancel)."""
        return TaskView.of(self._tasks.cancel(task_id, owner))

    def deliveries(self, task_id: str, owner: str) -> dict[str, Any]:
        """The task's webhook delivery log: every attempt, oldest first."""
        return as_log(self._tasks.get_for_owner(task_id, owner))

    def redeliver(self, task_id: str, owner: str) -> Redelivery:
        """Send the task's final event to its webhook again (a new delivery id), within the
        redelivery limits (gpuqueue.notify.redelivery)."""
        task = self._tasks.get_for_owner(task_id, owner)
        if self._redeliveries is None:
            raise TaskStateConflict(f"task {task_id} has no webhook_url", field="task_id")
        return self._redeliveries.request(task)

    def image_url(self, task_id: str, owner: str) -> str:
        """A short-lived presigned URL of a DONE task's PNG; ResultExpired once the bucket
        may have deleted it."""
        task = self._tasks.get_for_owner(task_id, owner)
        if task.status is not TaskStatus.DONE or not task.result_key:
            raise TaskStateConflict(
                f"task {task_id} is {task.status.value}; no image yet", field="task_id"
            )
        images = self._images
        check_image_kept(datetime.fromisoformat(task.updated_at), kept=images.kept, now=utc_now())
        return images.store.presigned_get(
            task.result_key, expires_in_seconds=images.url_ttl_seconds
        )
