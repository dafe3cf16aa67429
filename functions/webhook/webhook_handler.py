"""The webhook queue's consumer: one signed POST per message (WebhookConsumer); a failure
comes back after a jittered exponential backoff (the message's visibility), the last one is
dead-lettered."""

from __future__ import annotations

from functools import cache
from typing import Any

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
from gpuqueue.notify.pinned_poster import PinnedPoster
from gpuqueue.notify.webhook_consumer import WebhookConsumer
from gpuqueue.notify.webhook_delivery import DeliveryOutcome, WebhookDeliverer
from gpuqueue.notify.webhook_messages import DeliveryMessage
from gpuqueue.notify.webhook_signing import SigningSecrets
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import WebhookSettings
from gpuqueue.store.task_store import TaskStore

observed = Observability(publishes_metrics=True)
logger, metrics = observed.logger, observed.metrics
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


class RetryLater(Exception):
    """The attempt failed; the message comes back after its new visibility timeout."""


@cache
def consumer() -> WebhookConsumer:
    config = WebhookSettings()
    return WebhookConsumer(
        WebhookDeliverer(
            tasks=TaskStore(aws_clients.dynamodb().Table(config.tasks_table)),
            poster=PinnedPoster(),
            secrets=SigningSecrets(aws_clients.secretsmanager(), config.webhook_secret_arn),
            allow_loopback=config.webhook_allow_loopback,
            max_attempts=config.webhook_max_attempts,
            retry_base_seconds=config.webhook_retry_base_seconds,
            retry_cap_seconds=config.webhook_retry_cap_seconds,
        ),
        sqs=aws_clients.sqs(),
        queue_url=config.webhook_queue_url,
        dead_letter_queue_url=config.webhook_dead_letter_queue_url,
        metrics=metrics,
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
    result = consumer().consume(
        message, attempt=attempt, body=record.body, receipt_handle=record.receipt_handle
    )
    logger.info(
        "webhook attempt",
        extra={"outcome": result.outcome.value, "attempt": attempt, "event": message.event.value},
    )
    if result.outcome is DeliveryOutcome.RETRY:
        raise RetryLater(f"retry in {result.delay_seconds} s")


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
