"""What follows a task's change of state, driven by the tasks table's stream.

The stream sees every write, whoever made it (the dispatcher, a cancel, the upload check, a
queue deadline, a dead-lettered message once something ends it), so work that must follow
each transition hangs here rather than on every code path that writes. Delivery is
at-least-once: everything done here must be safe to repeat.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aws_lambda_powertools import Logger

from gpuqueue.intake.active_share import ActiveTaskShare
from gpuqueue.intake.queue_position import QueuePositions, departure_time
from gpuqueue.models import Priority, Task, TaskProgress, TaskStatus
from gpuqueue.task_states import PROGRESS, WAITING_LINE_STATUS

logger = Logger(child=True)


def stream_filters() -> list[dict[str, Any]]:
    """The stream records this consumer acts on, as Lambda event filter patterns (what the
    function's FilterCriteria in template.yaml must say): a write that ends a task, one
    that takes a never-started task out of the waiting line, and the two running writes its
    owner watches (pushed, never sent as webhooks): its GPU's progress, and its cancel asked.

    Every record that passes costs a share of an invocation, so the running ones are kept
    tight. A filter cannot compare the old image with the new, so "progress changed" is
    "the new image has progress": the other writes of a RUNNING task clear it (a next
    attempt and a claim start over from no progress), leaving only progress writes and a
    cancel asked mid-run; a renewed lease or another attempt never passes. The consumer
    drops what passes without a change (`TaskTransition.progressed`)."""
    final = [status.value for status in TaskStatus if status.is_terminal]
    waiting = WAITING_LINE_STATUS.value
    # The state PROGRESS and REQUEST_CANCEL keep (each goes RUNNING -> RUNNING).
    running = PROGRESS.target.value
    return [
        {
            "eventName": ["MODIFY"],
            "dynamodb": {
                "NewImage": {"status": {"S": final}},
                "OldImage": {"status": {"S": [{"anything-but": final}]}},
            },
        },
        {
            "eventName": ["MODIFY"],
            "dynamodb": {
                "OldImage": {"status": {"S": [waiting]}, "attempt": {"N": ["0"]}},
                "NewImage": {"status": {"S": [{"anything-but": [waiting]}]}},
            },
        },
        {
            "eventName": ["MODIFY"],
            "dynamodb": {
                "OldImage": {"status": {"S": [running]}},
                # `exists` only matches a leaf: the step inside the progress map.
                "NewImage": {
                    "status": {"S": [running]},
                    "progress": {"M": {"step": {"N": [{"exists": True}]}}},
                },
            },
        },
        {
            "eventName": ["MODIFY"],
            "dynamodb": {
                "OldImage": {
                    "status": {"S": [running]},
                    "cancel_requested_at": {"S": [{"exists": False}]},
                },
                "NewImage": {
                    "status": {"S": [running]},
                    "cancel_requested_at": {"S": [{"exists": True}]},
                },
            },
        },
    ]


def _status(image: Mapping[str, Any] | None) -> TaskStatus | None:
    if not image or "status" not in image:
        return None
    try:
        return TaskStatus(str(image["status"]))
    except ValueError:
        return None


class TaskEndListener(Protocol):
    """Told of the tasks that reached a final state, once per stream batch (at least once:
    must be idempotent or tolerate a repeat)."""

    def tasks_ended(self, tasks: Sequence[Task]) -> None: ...


class RunningTaskListener(Protocol):
    """Told of running tasks whose owner would want to see a change (new progress, a
    cancel asked), once per stream batch, each task as it last stood in the batch; best
    effort: it must not raise (a retried batch would repeat every other effect)."""

    def tasks_changed(self, tasks: Sequence[Task]) -> None: ...


def _attempt(image: Mapping[str, Any] | None) -> int | None:
    if not image:
        return None
    try:
        return int(image.get("attempt", 0))
    except (TypeError, ValueError):
        return None


def _lane(image: Mapping[str, Any]) -> Priority:
    try:
        return Priority(str(image.get("priority", Priority.NORMAL.value)))
    except ValueError:
        return Priority.NORMAL


def _progress_of(item: Any) -> TaskProgress | None:
    try:
        return TaskProgress.model_validate(item)
    except ValueError:
        return None


def _task(image: Mapping[str, Any] | None) -> Task | None:
    if not image:
        return None
    try:
        return Task.model_validate(dict(image))
    except ValueError:
        logger.warning("task row not readable", extra={"task_id": image.get("task_id")})
        return None


@dataclass(frozen=True)
class TaskTransition:
    task_id: str
    user_id: str
    before: TaskStatus | None  # None: the row is new
    after: TaskStatus | None  # None: the row was deleted (TTL)
    task: Task | None = None  # the row after the write (None when deleted or unreadable)
    before_attempt: int | None = None
    lane: Priority = Priority.NORMAL
    before_progress: Any = None  # the old image's progress map (None: it had none)
    before_cancel_requested: bool = False

    @classmethod
    def of(
        cls, old_image: Mapping[str, Any] | None, new_image: Mapping[str, Any] | None
    ) -> TaskTransition | None:
        """The transition a stream record shows; None if it is not a task row."""
        image = new_image or old_image
        if not image or "task_id" not in image or "user_id" not in image:
            return None
        return cls(
            task_id=str(image["task_id"]),
            user_id=str(image["user_id"]),
            before=_status(old_image),
            after=_status(new_image),
            task=_task(new_image),
            before_attempt=_attempt(old_image),
            lane=_lane(image),
            before_progress=(old_image or {}).get("progress"),
            before_cancel_requested="cancel_requested_at" in (old_image or {}),
        )

    @property
    def left_waiting_line(self) -> bool:
        """A task queued and never started stopped waiting (it started, or ended first)."""
        return (
            self.before is WAITING_LINE_STATUS
            and self.before_attempt == 0
            and self.after is not WAITING_LINE_STATUS
        )

    @property
    def progressed(self) -> bool:
        """A running task's GPU reported a step count other than the one it had."""
        task = self.task
        return (
            self._still_running
            and task is not None
            and task.progress is not None
            and (
                self.before_progress is None or task.progress != _progress_of(self.before_progress)
            )
        )

    @property
    def cancel_asked(self) -> bool:
        """Its owner asked to cancel it while it ran (the GPU is being told to stop)."""
        task = self.task
        return (
            self._still_running
            and not self.before_cancel_requested
            and task is not None
            and task.cancel_requested_at is not None
        )

    @property
    def _still_running(self) -> bool:
        return self.before is TaskStatus.RUNNING and self.after is TaskStatus.RUNNING

    @property
    def ended(self) -> bool:
        """The task stopped being active with this write (it reached a final state)."""
        was_active = self.before is None or not self.before.is_terminal
        return was_active and self.after is not None and self.after.is_terminal


class TaskEvents:
    def __init__(
        self,
        *,
        share: ActiveTaskShare | None,
        listeners: Sequence[TaskEndListener] = (),
        positions: QueuePositions | None = None,
        running_listeners: Sequence[RunningTaskListener] = (),
    ) -> None:
        self._share = share
        self._listeners = list(listeners)
        self._positions = positions
        self._running_listeners = list(running_listeners)

    def handle(self, transition: TaskTransition) -> None:
        self.handle_batch([transition])

    def _tell_running(self, changed: Mapping[str, Task], ended: Mapping[str, Any]) -> None:
        # A task that ended in the same batch: its end says more than its last step.
        running = [task for task_id, task in changed.items() if task_id not in ended]
        if running:
            for listener in self._running_listeners:
                listener.tasks_changed(running)

    def handle_batch(self, transitions: Sequence[TaskTransition]) -> None:
        """A stream batch's transitions, their effects aggregated: one share release per
        owner, one listener call, one departure write per lane, whatever the batch's size
        (per task, these rows were hot keys: the lane row took up to 7 requests a task);
        a running task's changes told once, as it last stood (a batch may hold several of
        its progress writes; none if it ended in the same batch).

        Idempotent effects first, counts last: a failure has the whole batch retried, and
        a repeated count is the only repeat that shows (a departure or an outcome counted
        twice; releases, webhook deliveries and pushes are deduplicated)."""
        departures: dict[Priority, list[float | None]] = defaultdict(list)
        ended: dict[str, TaskTransition] = {}
        changed: dict[str, Task] = {}  # per task, its latest running change in the batch
        for transition in transitions:
            if transition.task is not None and (transition.progressed or transition.cancel_asked):
                changed[transition.task_id] = transition.task
            if transition.left_waiting_line:
                task = transition.task
                departures[transition.lane].append(
                    departure_time(task.updated_at) if task is not None else None
                )
            if transition.ended:
                ended[transition.task_id] = transition
        self._tell_running(changed, ended)
        if self._share is not None:
            by_owner: dict[str, set[str]] = defaultdict(set)
            for transition in ended.values():
                by_owner[transition.user_id].add(transition.task_id)
            for owner, task_ids in by_owner.items():
                self._share.release_many(owner, task_ids)
                logger.info(
                    "active-task shares released",
                    extra={"user_id": owner, "task_ids": sorted(task_ids)},
                )
        tasks = [t.task for t in ended.values() if t.task is not None]
        if tasks:
            for listener in self._listeners:
                listener.tasks_ended(tasks)
        if self._positions is not None:
            for lane, times in departures.items():
                self._positions.left_many(lane, times)
