"""The webhook queue's consumer: one signed POST per message; a failure comes back after a
jittered exponential backoff (the message's visibility), the last one is dead-lettered."""

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
from gpuqueue.notify.webhooks import (
    DeliveryMessage,
    Outcome,
    PinnedPoster,
    SigningSecrets,
    WebhookDeliverer,
)
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import WebhookSettings
from gpuqueue.store.task_store import TaskStore

observed = Observability(publishes_metrics=True)
logger, metrics = observed.logger, observed.metrics
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


class RetryLater(Exception):
    """The attempt failed; the message comes back after its new visibility timeout."""


@cache
def settings() -> WebhookSettings:
    return WebhookSettings()


@cache
def deliverer() -> WebhookDeliverer:
    config = settings()
    return WebhookDeliverer(
        tasks=TaskStore(aws_clients.dynamodb().Table(config.tasks_table)),
        poster=PinnedPoster(),
        secrets=SigningSecrets(aws_clients.secretsmanager(), config.webhook_secret_arn),
        allow_loopback=config.webhook_allow_loopback,
        max_attempts=config.webhook_max_attempts,
        retry_base_seconds=config.webhook_retry_base_seconds,
        retry_cap_seconds=config.webhook_retry_cap_seconds,
    )


def record_handler(record: SQSRecord) -> None:
    try:
        message = DeliveryMessage.model_validate_json(record.body)
    except ValidationError:
        logger.error("not a delivery message; dropped", extra={"body": record.body[:200]})
        return
    correlate_task(logger, message.task_id)
    logger.append_keys(delivery_id=message.delivery_id)
    attempt = int(record.attributes.approximate_receive_count)
    result = deliverer().deliver(message, attempt=attempt)
    logger.info(
        "webhook attempt",
        extra={"outcome": result.outcome.value, "attempt": attempt, "event": message.event.value},
    )
    if result.outcome is Outcome.DELIVERED:
        metrics.add_metric(name="WebhooksDelivered", unit=MetricUnit.Count, value=1)
    elif result.outcome is Outcome.GAVE_UP:
        metrics.add_metric(name="WebhooksDeadLettered", unit=MetricUnit.Count, value=1)
        aws_clients.sqs().send_message(
            QueueUrl=settings().webhook_dead_letter_queue_url, MessageBody=record.body
        )
    elif result.outcome is Outcome.RETRY:
        metrics.add_metric(name="WebhookRetries", unit=MetricUnit.Count, value=1)
        aws_clients.sqs().change_message_visibility(
            QueueUrl=settings().webhook_queue_url,
            ReceiptHandle=record.receipt_handle,
            VisibilityTimeout=min(result.delay_seconds, 43_200),
        )
        raise RetryLater(f"retry in {result.delay_seconds} s")


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
