"""The tasks table's stream: what follows each task's transition into a final state
(today: its owner's active-task share is released). Partial batch responses: a record that
fails is retried from there on; one that keeps failing goes to the stream's dead-letter queue.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.active_share import ActiveTaskShare
from gpuqueue.settings import TaskEventsSettings
from gpuqueue.task_events import TaskEvents, TaskTransition

logger = Logger()
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.DynamoDBStreams)


@cache
def task_events() -> TaskEvents:
    settings = TaskEventsSettings()
    share = ActiveTaskShare(
        aws_clients.dynamodb().Table(settings.limits_table),
        limit=settings.max_active_tasks_per_user,
    )
    return TaskEvents(share=share)


def record_handler(record: DynamoDBRecord) -> None:
    stream = record.dynamodb
    if stream is None:
        return
    transition = TaskTransition.of(stream.old_image, stream.new_image)
    if transition is None:
        return
    logger.append_keys(task_id=transition.task_id)
    task_events().handle(transition)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
