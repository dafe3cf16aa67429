"""Scheduled: heal what a crash left behind (lost messages, dead workers, missed uploads)."""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.lifecycle.reaper import Reaper, ReaperPolicy
from gpuqueue.models import Priority
from gpuqueue.observability import Observability
from gpuqueue.settings import ReaperSettings
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue.store.task_store import TaskStore

observed = Observability(publishes_metrics=True)
logger, metrics = observed.logger, observed.metrics


@cache
def reaper() -> Reaper:
    settings = ReaperSettings()
    sqs = aws_clients.sqs()
    lanes = {Priority.NORMAL: TaskQueue(sqs, settings.task_queue_url)}
    if settings.priority_queue_url:
        lanes[Priority.HIGH] = TaskQueue(sqs, settings.priority_queue_url)
    return Reaper(
        tasks=TaskStore(aws_clients.dynamodb().Table(settings.tasks_table)),
        lanes=lanes,
        policy=ReaperPolicy(
            max_attempts=settings.max_attempts,
            requeue_after_seconds=settings.reaper_requeue_after_seconds,
            lease_grace_seconds=settings.reaper_lease_grace_seconds,
        ),
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    report = reaper().run()
    summary = report.summary()
    if report.total:
        metrics.add_metric(name="TasksReaped", unit=MetricUnit.Count, value=report.total)
        logger.warning("reaped stuck tasks", extra=summary)
    else:
        logger.info("nothing stuck")
    return summary
