"""ImageIntake, the submit route's domain call, on in-memory rows: the task queued and
counted, and `Prefer: wait` answered with the task once it is final."""

from __future__ import annotations

from typing import Any, cast

from aws_lambda_powertools import Logger

from fakes import MetricsRecorder, RowTable
from gpuqueue.intake.image_intake import ImageIntake
from gpuqueue.intake.intake_metrics import IntakeMetrics
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.models import ImageRequest, QueueMessage, TaskStatus
from gpuqueue.store.task_store import TaskStore


class InstantQueue:
    """A queue whose GPU finishes each task as it is sent (or never, `finishes=False`)."""

    def __init__(self, table: RowTable, *, finishes: bool) -> None:
        self._table = table
        self._finishes = finishes
        self.sent: list[QueueMessage] = []

    def send(self, message: QueueMessage) -> None:
        self.sent.append(message)
        if self._finishes:
            self._table.rows[message.task_id]["status"] = TaskStatus.DONE.value


def _intake(*, finishes: bool) -> tuple[ImageIntake, InstantQueue, MetricsRecorder]:
    table = RowTable()
    queue = InstantQueue(table, finishes=finishes)
    recorder = MetricsRecorder()
    submissions = SubmissionService(
        tasks=TaskStore(cast(Any, table)),
        queue=cast(Any, queue),
        capacity=10,
        metrics=IntakeMetrics(cast(Any, recorder)),
    )
    intake = ImageIntake(submissions, logger=Logger(service="test"), wait_seats=None)
    return intake, queue, recorder


def _accept(intake: ImageIntake, prefer: str | None, remaining: float = 29.0) -> Any:
    return intake.accept(
        "alice",
        ImageRequest(prompt="a red fox"),
        groups=frozenset(),
        idempotency_key="ignored without an idempotency table",
        prefer=prefer,
        remaining_seconds=lambda: remaining,
    )


def test_a_submit_queues_the_task_and_counts_it():
    intake, queue, recorder = _intake(finishes=False)

    accepted = _accept(intake, prefer=None)

    assert accepted.answer == {
        "task_id": accepted.task_id,
        "status": "QUEUED",
        "message": "task submitted successfully",
    }
    assert [m.task_id for m in queue.sent] == [accepted.task_id]
    assert recorder.added == ["TasksSubmitted"]
    assert accepted.wait_headers == {}
    assert accepted.finished is None


def test_a_task_final_within_the_wait_is_the_answer_itself():
    intake, _, _ = _intake(finishes=True)

    accepted = _accept(intake, prefer="wait=10")

    assert accepted.finished is not None
    assert accepted.finished.task_id == accepted.task_id
    assert accepted.finished.status is TaskStatus.DONE
    assert accepted.wait_headers == {"Preference-Applied": "wait=10"}


def test_a_task_still_queued_when_the_invocation_has_no_time_left_is_the_202_answer():
    intake, _, _ = _intake(finishes=False)

    accepted = _accept(intake, prefer="wait=10", remaining=1.0)

    assert accepted.finished is None
    assert accepted.answer["status"] == "QUEUED"
    assert accepted.wait_headers == {"Preference-Applied": "wait=10"}
