"""The dead-letter queues' consumer: a dead-lettered task ends FAILED with the reason.

A task still under a live lease is reported as a batch item failure, so its message comes
back after the dead-letter queue's visibility timeout and is looked at again.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from gpuqueue import aws_clients
from gpuqueue.lifecycle.dead_letters import DeadLetters, Settled
from gpuqueue.models import QueueMessage
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import DeadLetterSettings
from gpuqueue.store.task_store import TaskStore

observed = Observability(publishes_metrics=True)
logger, metrics = observed.logger, observed.metrics
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@cache
def dead_letters() -> DeadLetters:
    settings = DeadLetterSettings()
    return DeadLetters(TaskStore(aws_clients.dynamodb().Table(settings.tasks_table)))


@cache
def lanes() -> dict[str, str]:
    """Dead-letter queue ARN -> the lane whose messages it holds."""
    settings = DeadLetterSettings()
    return {arn: lane for lane, arn in settings.lane_dead_letter_arns().items()}


def record_handler(record: SQSRecord) -> None:
    try:
        message = QueueMessage.model_validate_json(record.body)
    except ValidationError:
        logger.error("not a task message; dropped", extra={"body": record.body[:200]})
        return
    correlate_task(logger, message.task_id)
    lane = lanes().get(record.event_source_arn or "", "task")
    settled = dead_letters().settle(message, lane=lane)
    logger.info("dead-lettered task settled", extra={"settled": settled.value, "lane": lane})
    if settled is Settled.FAILED:
        metrics.add_metric(name="TasksDeadLettered", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="TasksFailed", unit=MetricUnit.Count, value=1)


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
