"""IntakeMetrics: the figures the submit alarms and the dashboard read, by refusal."""

from __future__ import annotations

from typing import Any, cast

import pytest

from gpuqueue.errors import ActiveTaskLimit, NewAccountLimit, RateLimited
from gpuqueue.intake.intake_metrics import IntakeMetrics


class MetricsRecorder:
    def __init__(self) -> None:
        self.added: list[tuple[str, float]] = []

    def add_metric(self, *, name: str, unit: Any, value: float) -> None:
        self.added.append((name, value))


@pytest.mark.parametrize(
    ("refusal", "metric"),
    [
        (RateLimited("slow down", retry_after_seconds=1, headers={}), "RateLimitHits"),
        (ActiveTaskLimit("too many", limit=3), "ActiveTaskLimitHits"),
        (NewAccountLimit("new account", limit=1), "ActiveTaskLimitHits"),
    ],
)
def test_each_refusal_counts_once_under_its_name(refusal: RateLimited, metric: str) -> None:
    recorder = MetricsRecorder()

    IntakeMetrics(cast(Any, recorder)).refused(refusal)

    assert recorder.added == [(metric, 1)]


def test_a_queued_task_counts_as_submitted() -> None:
    recorder = MetricsRecorder()

    IntakeMetrics(cast(Any, recorder)).submitted()

    assert recorder.added == [("TasksSubmitted", 1)]
