"""POST /api/v1/image/async as one call: the task is admitted and queued (once per
Idempotency-Key), then `Prefer: wait` is honoured."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger, Metrics

from gpuqueue import aws_clients
from gpuqueue.api.prefer_wait import WaitSeats, honour_prefer_wait
from gpuqueue.intake.idempotent_submit import IdempotentSubmitter
from gpuqueue.intake.intake_metrics import IntakeMetrics
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.models import ImageRequest, SubmitResponse, TaskView
from gpuqueue.observability import correlate_task
from gpuqueue.settings import SubmitSettings


@dataclass(frozen=True)
class Accepted:
    task_id: str
    answer: dict[str, Any]  # the 202's body, JSON-ready (what an Idempotency-Key replays)
    rate_headers: dict[str, str]  # X-RateLimit-*
    wait_headers: dict[str, str]  # Preference-Applied, when a wait was honoured
    finished: TaskView | None  # final within the wait: the answer is the task itself


class ImageIntake:
    def __init__(
        self,
        submissions: SubmissionService,
        *,
        logger: Logger,
        wait_seats: WaitSeats | None,
        idempotency_table: str | None = None,
        idempotency_ttl_seconds: int = 86_400,
        dynamodb_client: Any = None,
    ) -> None:
        self._submissions = submissions
        self._logger = logger
        self._wait_seats = wait_seats
        # Without a table, an Idempotency-Key is ignored (each request is a new task).
        self.idempotent = (
            IdempotentSubmitter(
                table_name=idempotency_table,
                expires_after_seconds=idempotency_ttl_seconds,
                submit=self._submit_once,
                client=dynamodb_client,
            )
            if idempotency_table
            else None
        )

    @classmethod
    def from_settings(
        cls, settings: SubmitSettings, *, metrics: Metrics, logger: Logger
    ) -> ImageIntake:
        """The intake as SubmitFunction builds it, from its environment."""
        return cls(
            SubmissionService.from_settings(settings, metrics=IntakeMetrics(metrics)),
            logger=logger,
            wait_seats=WaitSeats(
                aws_clients.dynamodb().Table(settings.limits_table),
                seats=settings.prefer_wait_seats,
            ),
            idempotency_table=settings.limits_table or None,
            idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
            dynamodb_client=aws_clients.dynamodb_client() if settings.limits_table else None,
        )

    def accept(
        self,
        owner: str,
        request: ImageRequest,
        *,
        groups: frozenset[str],
        idempotency_key: str | None,
        prefer: str | None,
        remaining_seconds: Callable[[], float],
    ) -> Accepted:
        """Queue the image task (the first answer again for a repeated Idempotency-Key),
        then wait for it as `Prefer` asks."""
        body = request.model_dump(mode="json", exclude_none=True)
        if idempotency_key is not None and self.idempotent is not None:
            answer = self.idempotent.submit(owner, idempotency_key, body, groups)
        else:
            answer = self._submit_once(owner, body, groups)
        task_id = str(answer["task_id"])
        rate_headers = self._submissions.rate_headers(owner)
        waited = honour_prefer_wait(
            prefer,
            lambda: self._submissions.tasks.get_for_owner(task_id, owner),
            remaining_seconds=remaining_seconds,
            seats=self._wait_seats,
        )
        finished = None
        if waited is not None and waited.task.status.is_terminal:
            # Finished within the wait: the task itself, as a status call would answer.
            finished = TaskView.of(waited.task)
        return Accepted(
            task_id=task_id,
            answer=answer,
            rate_headers=rate_headers,
            wait_headers=waited.headers if waited is not None else {},
            finished=finished,
        )

    def _submit_once(
        self, owner: str, body: dict[str, Any], groups: Collection[str]
    ) -> dict[str, Any]:
        """One image task; its answer as JSON-ready data (what an Idempotency-Key replays)."""
        task = self._submissions.submit_image(
            owner, ImageRequest.model_validate(body), groups=groups
        )
        correlate_task(self._logger, task.task_id)
        self._logger.info("task queued")
        answer = SubmitResponse(
            task_id=task.task_id, status=task.status, message="task submitted successfully"
        )
        return answer.model_dump(mode="json")
