"""What the dispatcher measures, as CloudWatch metrics (Powertools EMF).

The dispatcher reports events to a `DispatchObserver`; `DispatchMetrics` turns them into
the figures the alarms and the dashboard read (template.yaml): QueueWait (queued -> first
start), GenerationLatency / TranscriptionLatency (a successful GPU call), EndToEndLatency
(created -> DONE) and EndpointFailures. Milliseconds, so percentiles keep their precision.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from gpuqueue.models import Task, TaskKind

CALL_LATENCY_METRIC = {
    TaskKind.IMAGE: "GenerationLatency",
    TaskKind.SPEECH: "TranscriptionLatency",
}


class DispatchObserver(Protocol):
    def task_started(self, task: Task, *, at: float) -> None:
        """A claim succeeded (`task` as claimed: attempt already counted)."""

    def gpu_call_failed(self, task: Task, *, endpoint_id: str, retryable: bool) -> None: ...

    def task_done(self, task: Task, *, call_seconds: float, at: float) -> None: ...


def queued_at(task: Task) -> float:
    """When the task entered the queue: its queue deadline minus its allowance (a long-audio
    task queues when its upload lands, not when it was announced), else its creation."""
    if task.queue_deadline is not None and task.queue_ttl_seconds is not None:
        return task.queue_deadline - task.queue_ttl_seconds
    return _epoch(task.created_at)


def _epoch(iso_time: str) -> float:
    return datetime.fromisoformat(iso_time).timestamp()


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000.0, 1)


class DispatchMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def task_started(self, task: Task, *, at: float) -> None:
        if task.attempt == 1:  # the wait in line, not the wait between retries
            self._metrics.add_metric(
                name="QueueWait", unit=MetricUnit.Milliseconds, value=_ms(at - queued_at(task))
            )

    def gpu_call_failed(self, task: Task, *, endpoint_id: str, retryable: bool) -> None:
        self._metrics.add_metric(name="EndpointFailures", unit=MetricUnit.Count, value=1)

    def task_done(self, task: Task, *, call_seconds: float, at: float) -> None:
        self._metrics.add_metric(
            name=CALL_LATENCY_METRIC[task.kind],
            unit=MetricUnit.Milliseconds,
            value=_ms(call_seconds),
        )
        self._metrics.add_metric(
            name="EndToEndLatency",
            unit=MetricUnit.Milliseconds,
            value=_ms(at - _epoch(task.created_at)),
        )
