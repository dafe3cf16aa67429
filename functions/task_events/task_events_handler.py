"""The tasks table's stream: what follows each task's transition into a final state (its
owner's active-task share is released; its webhook delivery is queued; it is counted in
the last hour's outcomes), aggregated per batch; and a running task's progress or cancel
asked, pushed to its owner's WebSocket connections. A batch whose effects fail is retried
whole; the mapping bisects it, so a record that keeps failing is isolated and goes to the
stream's dead-letter queue.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import (
    DynamoDBRecord,
    DynamoDBStreamEvent,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.intake.active_share import ActiveTaskShare
from gpuqueue.intake.queue_position import QueuePositions
from gpuqueue.lifecycle.outcome_counters import OutcomeCounters, OutcomeRecorder
from gpuqueue.lifecycle.task_events import (
    RunningTaskListener,
    TaskEndListener,
    TaskEvents,
    TaskTransition,
)
from gpuqueue.notify.push import ConnectionStore, PushNotifier, management_api
from gpuqueue.notify.webhook_messages import SqsDeliverySender, WebhookNotifier
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import TaskEventsSettings

observed = Observability(publishes_metrics=True)
logger, metrics = observed.logger, observed.metrics


@cache
def task_events() -> TaskEvents:
    settings = TaskEventsSettings()
    limits = aws_clients.dynamodb().Table(settings.limits_table)
    share = ActiveTaskShare(limits, limit=settings.max_active_tasks_per_user)
    listeners: list[TaskEndListener] = []
    running_listeners: list[RunningTaskListener] = []
    if settings.webhook_queue_url:
        listeners.append(
            WebhookNotifier(SqsDeliverySender(aws_clients.sqs(), settings.webhook_queue_url))
        )
    if settings.connections_table and settings.websocket_management_url:
        connections = ConnectionStore(aws_clients.dynamodb().Table(settings.connections_table))
        pusher = PushNotifier(connections, management_api(settings.websocket_management_url))
        listeners.append(pusher)
        # Progress and a cancel asked: pushed only, never webhooks nor counted.
        running_listeners.append(pusher)
    # Last: a listener that fails has the record retried, and counting twice is the worse
    # repeat (webhook deliveries and pushes are deduplicated downstream).
    listeners.append(
        OutcomeRecorder(OutcomeCounters(limits, shards=settings.outcome_counter_shards))
    )
    return TaskEvents(
        share=share,
        listeners=listeners,
        positions=QueuePositions(limits),
        running_listeners=running_listeners,
    )


def transition_of(record: DynamoDBRecord) -> TaskTransition | None:
    stream = record.dynamodb
    if stream is None:
        return None
    return TaskTransition.of(stream.old_image, stream.new_image)


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    event_batch = DynamoDBStreamEvent(event)
    transitions = [t for r in event_batch.records if (t := transition_of(r)) is not None]
    if len(transitions) == 1:
        correlate_task(logger, transitions[0].task_id)
    # Raises on failure: the whole batch comes back (bisected), its effects being safe to
    # repeat; no record is reported on its own, as none is handled on its own.
    task_events().handle_batch(transitions)
    return {"batchItemFailures": []}
