"""What follows a task's change of state, driven by the tasks table's stream.

The stream sees every write, whoever made it (the dispatcher, a cancel, the upload check, a
queue deadline, a dead-lettered message once something ends it), so work that must follow
each transition hangs here rather than on every code path that writes. Delivery is
at-least-once: everything done here must be safe to repeat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger

from gpuqueue.active_share import ActiveTaskShare
from gpuqueue.models import TaskStatus

logger = Logger(child=True)


def _status(image: Mapping[str, Any] | None) -> TaskStatus | None:
    if not image or "status" not in image:
        return None
    try:
        return TaskStatus(str(image["status"]))
    except ValueError:
        return None


@dataclass(frozen=True)
class TaskTransition:
    task_id: str
    user_id: str
    before: TaskStatus | None  # None: the row is new
    after: TaskStatus | None  # None: the row was deleted (TTL)

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
        )

    @property
    def ended(self) -> bool:
        """The task stopped being active with this write (it reached a final state)."""
        was_active = self.before is None or not self.before.is_terminal
        return was_active and self.after is not None and self.after.is_terminal


class TaskEvents:
    def __init__(self, *, share: ActiveTaskShare | None) -> None:
        self._share = share

    def handle(self, transition: TaskTransition) -> None:
        if transition.ended and self._share is not None:
            self._share.release(transition.user_id, transition.task_id)
            logger.info(
                "active-task share released",
                extra={"task_id": transition.task_id, "status": transition.after},
            )
