"""What accepting tasks measures, as CloudWatch metrics (Powertools EMF): TasksSubmitted, and
the refused submits, RateLimitHits and ActiveTaskLimitHits (the alarms and the dashboard in
template.yaml read them). Counted by SubmissionService, so every submit route counts the
same way."""

from __future__ import annotations

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from gpuqueue.errors import ActiveTaskLimit, RateLimited


class IntakeMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def submitted(self) -> None:
        """A task entered its queue."""
        self._metrics.add_metric(name="TasksSubmitted", unit=MetricUnit.Count, value=1)

    def refused(self, refusal: RateLimited) -> None:
        """A submit was refused: the owner's rate or their active-task share was spent."""
        name = "ActiveTaskLimitHits" if isinstance(refusal, ActiveTaskLimit) else "RateLimitHits"
        self._metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)
