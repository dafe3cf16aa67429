"""WebhookConsumer: each attempt's outcome is counted and its message settled on SQS."""

from __future__ import annotations

from typing import Any, cast

from fakes import MetricsRecorder
from gpuqueue.models import WebhookEvent
from gpuqueue.notify.webhook_consumer import WebhookConsumer
from gpuqueue.notify.webhook_delivery import DeliveryOutcome, DeliveryResult
from gpuqueue.notify.webhook_messages import DeliveryMessage


class FixedDeliverer:
    def __init__(self, result: DeliveryResult) -> None:
        self._result = result

    def deliver(self, message: DeliveryMessage, *, attempt: int) -> DeliveryResult:
        return self._result


class SqsRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def send_message(self, **request: Any) -> None:
        self.calls.append(("send_message", request))

    def change_message_visibility(self, **request: Any) -> None:
        self.calls.append(("change_message_visibility", request))


MESSAGE = DeliveryMessage(task_id="t1", delivery_id="d1", event=WebhookEvent.DONE)


def _consume(result: DeliveryResult) -> tuple[SqsRecorder, MetricsRecorder]:
    sqs, metrics = SqsRecorder(), MetricsRecorder()
    consumer = WebhookConsumer(
        cast(Any, FixedDeliverer(result)),
        sqs=sqs,
        queue_url="webhooks",
        dead_letter_queue_url="webhooks-dlq",
        metrics=cast(Any, metrics),
    )
    assert consumer.consume(MESSAGE, attempt=2, body="{...}", receipt_handle="r1") == result
    return sqs, metrics


def test_a_delivered_attempt_is_counted_and_its_message_left_to_be_deleted():
    sqs, metrics = _consume(DeliveryResult(DeliveryOutcome.DELIVERED))

    assert metrics.added == ["WebhooksDelivered"]
    assert sqs.calls == []


def test_a_failed_attempt_comes_back_after_its_delay_within_sqs_bound():
    sqs, metrics = _consume(DeliveryResult(DeliveryOutcome.RETRY, delay_seconds=90_000))

    assert metrics.added == ["WebhookRetries"]
    assert sqs.calls == [
        (
            "change_message_visibility",
            {"QueueUrl": "webhooks", "ReceiptHandle": "r1", "VisibilityTimeout": 43_200},
        )
    ]


def test_the_last_failed_attempt_goes_to_the_dead_letter_queue_as_it_came():
    sqs, metrics = _consume(DeliveryResult(DeliveryOutcome.GAVE_UP))

    assert metrics.added == ["WebhooksDeadLettered"]
    assert sqs.calls == [("send_message", {"QueueUrl": "webhooks-dlq", "MessageBody": "{...}"})]


def test_a_skipped_message_is_neither_counted_nor_settled() -> None:
    sqs, metrics = _consume(DeliveryResult(DeliveryOutcome.SKIPPED))

    assert metrics.added == []
    assert sqs.calls == []
