"""The webhook queue's consumer, one call per message: the attempt (WebhookDeliverer), its
count (WebhooksDelivered, WebhookRetries, WebhooksDeadLettered) and its message settled: a
failure comes back after a jittered exponential backoff (the message's visibility), the last
one is sent to the dead-letter queue."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from gpuqueue.notify.webhook_delivery import DeliveryOutcome, DeliveryResult, WebhookDeliverer
from gpuqueue.notify.webhook_messages import DeliveryMessage

# SQS's bound on a message's visibility timeout (12 h).
MAX_VISIBILITY_SECONDS = 43_200


class WebhookConsumer:
    def __init__(
        self,
        deliverer: WebhookDeliverer,
        *,
        sqs: Any,
        queue_url: str,
        dead_letter_queue_url: str,
        metrics: Metrics,
    ) -> None:
        self._deliverer = deliverer
        self._sqs = sqs
        self._queue_url = queue_url
        self._dead_letter_queue_url = dead_letter_queue_url
        self._metrics = metrics

    def consume(
        self, message: DeliveryMessage, *, attempt: int, body: str, receipt_handle: str
    ) -> DeliveryResult:
        """One attempt (`attempt`: the message's receive count); on RETRY the message's
        visibility is already its delay, and the caller must leave it on the queue."""
        result = self._deliverer.deliver(message, attempt=attempt)
        if result.outcome is DeliveryOutcome.DELIVERED:
            self._count("WebhooksDelivered")
        elif result.outcome is DeliveryOutcome.GAVE_UP:
            self._count("WebhooksDeadLettered")
            self._sqs.send_message(QueueUrl=self._dead_letter_queue_url, MessageBody=body)
        elif result.outcome is DeliveryOutcome.RETRY:
            self._count("WebhookRetries")
            self._sqs.change_message_visibility(
                QueueUrl=self._queue_url,
                ReceiptHandle=receipt_handle,
                VisibilityTimeout=min(result.delay_seconds, MAX_VISIBILITY_SECONDS),
            )
        return result

    def _count(self, name: str) -> None:
        self._metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
