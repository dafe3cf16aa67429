"""TaskQueue: the SQS task queue (and its dead-letter queue, for stats)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger

from gpuqueue.models import QueueMessage
from gpuqueue.store.sdk_errors import raises_store_error

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

logger = Logger(child=True)

# SQS deletes at most this many messages in one DeleteMessageBatch.
DELETE_BATCH = 10

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

    @raises_store_error("task queue")
    def send(self, message: QueueMessage, *, delay_seconds: int = 0) -> str:
        response = self._sqs.send_message(
            QueueUrl=self._url,
            MessageBody=message.model_dump_json(),
            # SQS caps a message delay at 15 minutes.
            DelaySeconds=max(0, min(delay_seconds, 900)),
        )
        return response["MessageId"]

    def receive(self, count: int) -> list[tuple[str, str]]:
        """Up to `count` (at most 10) visible messages' bodies and receipt handles, in one
        request, without waiting for any."""
        messages = self._sqs.receive_message(
            QueueUrl=self._url, MaxNumberOfMessages=max(1, min(count, 10)), WaitTimeSeconds=0
        ).get("Messages", [])
        return [(m["Body"], m["ReceiptHandle"]) for m in messages]

    def delete(self, receipts: Sequence[str]) -> None:
        """Delete received messages, ten to a request."""
        for start in range(0, len(receipts), DELETE_BATCH):
            batch = receipts[start : start + DELETE_BATCH]
            failed = self._sqs.delete_message_batch(
                QueueUrl=self._url,
                Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(batch)],
            ).get("Failed", [])
            if failed:
                # Such a message comes back after its visibility timeout; its task is ended
                # by then, so the next delivery only deletes it.
                logger.warning("messages not deleted", extra={"failed": failed})

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

    def release(self, receipts: Sequence[str]) -> None:
        """Make received messages visible again at once, ten to a request."""
        for start in range(0, len(receipts), DELETE_BATCH):
            batch = receipts[start : start + DELETE_BATCH]
            failed = self._sqs.change_message_visibility_batch(
                QueueUrl=self._url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": 0}
                    for i, r in enumerate(batch)
                ],
            ).get("Failed", [])
            if failed:
                # Such a message comes back when its visibility timeout ends instead.
                logger.warning("messages not released", extra={"failed": failed})

    def retry_after(self, receipt_handle: str, delay_seconds: int) -> None:
        """Make a received message visible again after a delay (backoff without a re-send)."""
        self._sqs.change_message_visibility(
            QueueUrl=self._url,
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=max(0, min(delay_seconds, 43_200)),
        )
