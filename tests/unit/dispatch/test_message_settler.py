"""MessageSettler: what a dispatched message's end means on its queue and in the metrics."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aws_lambda_powertools import Logger

from fakes import MetricsRecorder
from gpuqueue.dispatch.dispatcher import DispatchOutcome
from gpuqueue.dispatch.queue_worker import MessageSettler
from gpuqueue.errors import RetryLater
from gpuqueue.models import QueueMessage, TaskKind


class QueueRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def send(self, message: QueueMessage, *, delay_seconds: int) -> None:
        self.calls.append(("send", message.task_id, delay_seconds))

    def retry_after(self, receipt: str, delay_seconds: int) -> None:
        self.calls.append(("retry_after", receipt, delay_seconds))


MESSAGE = QueueMessage(task_id="t1", kind=TaskKind.IMAGE)


def _settler() -> tuple[MessageSettler, QueueRecorder, MetricsRecorder]:
    queue, metrics = QueueRecorder(), MetricsRecorder()
    settler = MessageSettler(
        cast(Any, queue), metrics=cast(Any, metrics), logger=Logger(service="test")
    )
    return settler, queue, metrics


@pytest.mark.parametrize(
    ("outcome", "counted"),
    [
        (DispatchOutcome.DONE, ["TasksSucceeded"]),
        (DispatchOutcome.FAILED, ["TasksFailed"]),
        (DispatchOutcome.EXPIRED, ["TasksExpired"]),
        (DispatchOutcome.SKIPPED, []),
        (DispatchOutcome.RETRY, []),
    ],
)
def test_each_final_outcome_is_counted_under_its_name(outcome: DispatchOutcome, counted: list[str]):
    settler, _, metrics = _settler()

    settler.count(outcome)

    assert metrics.added == counted


def test_a_retry_returns_the_same_message_after_its_delay_and_keeps_it():
    settler, queue, metrics = _settler()

    deleted = settler.return_later(RetryLater("GPU busy", delay_seconds=20), MESSAGE, "r1")

    assert deleted is False
    assert queue.calls == [("retry_after", "r1", 20)]
    assert metrics.added == ["TaskRetries"]


def test_a_requeue_sends_a_fresh_delayed_copy_and_deletes_the_original():
    settler, queue, metrics = _settler()

    retry = RetryLater("no endpoint", delay_seconds=60, requeue=True)
    deleted = settler.return_later(retry, MESSAGE, "r1")

    assert deleted is True
    assert queue.calls == [("send", "t1", 60)]
    assert metrics.added == []
