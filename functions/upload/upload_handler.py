"""S3 "Object Created" (via EventBridge) for audio/<task id>: queue the speech task.

Thin: parse the event, hand the key and size to SubmissionService.queue_uploaded, which
checks the size against what was announced, moves AWAITING_UPLOAD -> QUEUED + message and
counts TasksSubmitted.
A repeated event is harmless (the transition is conditional; a re-send is idempotent).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.data_classes import (
    S3EventBridgeNotificationEvent,
    event_source,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.intake.intake_metrics import IntakeMetrics
from gpuqueue.intake.queue_position import QueuePositions
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import UploadSettings
from gpuqueue.speech.audio import ASYNC_AUDIO_MAX_BYTES
from gpuqueue.speech.audio_store import task_id_of_audio_key
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue.store.task_store import TaskStore

observed = Observability(publishes_metrics=True)
logger, metrics = observed.logger, observed.metrics


@cache
def submissions() -> SubmissionService:
    settings = UploadSettings()
    return SubmissionService(
        tasks=TaskStore(aws_clients.dynamodb().Table(settings.tasks_table)),
        queue=TaskQueue(aws_clients.sqs(), settings.task_queue_url),
        priority_queue=(
            TaskQueue(aws_clients.sqs(), settings.priority_queue_url)
            if settings.priority_queue_url
            else None
        ),
        # The task was admitted against the queue's capacity when it was announced.
        capacity=2**31,
        positions=(
            QueuePositions(aws_clients.dynamodb().Table(settings.limits_table))
            if settings.limits_table
            else None
        ),
        metrics=IntakeMetrics(metrics),
    )


@observed.entry
@event_source(data_class=S3EventBridgeNotificationEvent)
def lambda_handler(event: S3EventBridgeNotificationEvent, context: LambdaContext) -> dict[str, Any]:
    key = event.detail.object.key
    task_id = task_id_of_audio_key(key)
    if task_id is None:
        logger.warning("object outside audio/", extra={"key": key})
        return {"queued": False}
    correlate_task(logger, task_id)
    task = submissions().queue_uploaded(
        task_id, size_bytes=int(event.detail.object.size or 0), max_bytes=ASYNC_AUDIO_MAX_BYTES
    )
    if task is not None:
        logger.info("uploaded audio queued")
    return {"queued": task is not None}
