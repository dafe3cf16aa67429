"""The tasks table's stream: what follows each task's transition into a final state (its
owner's active-task share is released; its webhook delivery is queued; it is counted in
the last hour's outcomes). Partial batch
responses: a record that fails is retried from there on; one that keeps failing goes to the
stream's dead-letter queue.
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
from gpuqueue.log_context import correlate_task
from gpuqueue.outcome_counters import OutcomeCounters, OutcomeRecorder
from gpuqueue.push import ConnectionStore, PushNotifier, management_api
from gpuqueue.queue_position import QueuePositions
from gpuqueue.settings import TaskEventsSettings
from gpuqueue.task_events import TaskEndListener, TaskEvents, TaskTransition
from gpuqueue.webhooks import SqsDeliverySender, WebhookNotifier

logger = Logger()
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.DynamoDBStreams)


@cache
def task_events() -> TaskEvents:
    settings = TaskEventsSettings()
    limits = aws_clients.dynamodb().Table(settings.limits_table)
    share = ActiveTaskShare(limits, limit=settings.max_active_tasks_per_user)
    listeners: list[TaskEndListener] = []
    if settings.webhook_queue_url:
        listeners.append(
            WebhookNotifier(SqsDeliverySender(aws_clients.sqs(), settings.webhook_queue_url))
        )
    if settings.connections_table and settings.websocket_management_url:
        connections = ConnectionStore(aws_clients.dynamodb().Table(settings.connections_table))
        listeners.append(
            PushNotifier(connections, management_api(settings.websocket_management_url))
        )
    # Last: a listener that fails has the record retried, and counting twice is the worse
    # repeat (webhook deliveries and pushes are deduplicated downstream).
    listeners.append(
        OutcomeRecorder(OutcomeCounters(limits, shards=settings.outcome_counter_shards))
    )
    return TaskEvents(share=share, listeners=listeners, positions=QueuePositions(limits))


def record_handler(record: DynamoDBRecord) -> None:
    stream = record.dynamodb
    if stream is None:
        return
    transition = TaskTransition.of(stream.old_image, stream.new_image)
    if transition is None:
        return
    correlate_task(logger, transition.task_id)
    task_events().handle(transition)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
