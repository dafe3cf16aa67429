"""The body a webhook receiver gets: the event, the delivery id and the task as the API shows
it, as compact JSON with sorted keys (the bytes the signature covers)."""

from __future__ import annotations

import json

from gpuqueue.models import Task, TaskView
from gpuqueue.notify.webhook_messages import DeliveryMessage


def payload(task: Task, message: DeliveryMessage) -> bytes:
    body = {
        "event": message.event.value,
        "delivery_id": message.delivery_id,
        "task": TaskView.of(task).model_dump(mode="json"),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
