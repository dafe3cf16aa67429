"""The webhook queue's messages: one per task and final event the task asked to hear of (from
the tasks table's stream, `WebhookNotifier`), or per redelivery its owner asked for; and the
sender that puts them on the queue."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel

from gpuqueue.models import Task, WebhookEvent


class DeliveryMessage(BaseModel):
    """What travels on the webhook queue: which task, which event, which delivery."""

    task_id: str
    event: WebhookEvent
    delivery_id: str


def delivery_id_for(task_id: str, event: WebhookEvent) -> str:
    """The same id for the same task and event: a repeated stream record makes a message with
    the same delivery id, which the deliverer recognises as already delivered."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"gpuqueue:{task_id}:{event.value}"))


def new_delivery(task: Task) -> DeliveryMessage:
    """A redelivery the owner asked for: the task's final event under a fresh delivery id."""
    return DeliveryMessage(
        task_id=task.task_id,
        event=WebhookEvent.for_status(task.status),
        delivery_id=str(uuid.uuid4()),
    )


class MessageSender(Protocol):
    def send(self, message: DeliveryMessage) -> None: ...


class WebhookNotifier:
    """A task-end listener: a delivery message for each task that asked for this event."""

    def __init__(self, sender: MessageSender) -> None:
        self._sender = sender

    def tasks_ended(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            self.task_ended(task)

    def task_ended(self, task: Task) -> None:
        event = WebhookEvent.for_status(task.status)
        if not task.wants_webhook(event):
            return
        self._sender.send(
            DeliveryMessage(
                task_id=task.task_id, event=event, delivery_id=delivery_id_for(task.task_id, event)
            )
        )


class SqsDeliverySender:
    def __init__(self, sqs: Any, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url

    def send(self, message: DeliveryMessage) -> None:
        self._sqs.send_message(QueueUrl=self._url, MessageBody=message.model_dump_json())
