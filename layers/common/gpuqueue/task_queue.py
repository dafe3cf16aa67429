"""TaskQueue: the SQS task queue (and its dead-letter queue, for stats)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpuqueue.models import QueueMessage

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

_DEPTH_ATTRIBUTES = [
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
]


@dataclass(frozen=True)
class QueueDepth:
    waiting: int  # visible, ready to be received
    in_flight: int  # received, not yet deleted (being processed, or waiting out a retry delay)
    delayed: int

    @property
    def queued(self) -> int:
        """Messages waiting for a worker: what counts against the queue's capacity."""
        return self.waiting + self.delayed

    @property
    def total(self) -> int:
        """Every message in the queue, held by a worker or not."""
        return self.waiting + self.in_flight + self.delayed


class TaskQueue:
    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url

    def send(self, message: QueueMessage, *, delay_seconds: int = 0) -> str:
        response = self._sqs.send_message(
            QueueUrl=self._url,
            MessageBody=message.model_dump_json(),
            # SQS caps a message delay at 15 minutes.
            DelaySeconds=max(0, min(delay_seconds, 900)),
        )
        return response["MessageId"]

    def depth(self) -> QueueDepth:
        attrs = self._sqs.get_queue_attributes(
            QueueUrl=self._url,
            AttributeNames=_DEPTH_ATTRIBUTES,  # type: ignore[arg-type]
        )["Attributes"]
        return QueueDepth(
            waiting=int(attrs.get("ApproximateNumberOfMessages", 0)),
            in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
            delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
        )

    def retry_after(self, receipt_handle: str, delay_seconds: int) -> None:
        """Make a received message visible again after a delay (backoff without a re-send)."""
        self._sqs.change_message_visibility(
            QueueUrl=self._url,
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=max(0, min(delay_seconds, 43_200)),
        )
