"""Scheduled: sync the declared GPU endpoints into the health table and probe each one."""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.endpoint_registry import EndpointRegistry
from gpuqueue.health_check import HealthChecker
from gpuqueue.models import TaskKind
from gpuqueue.settings import CheckerSettings

logger = Logger()
tracer = Tracer()
metrics = Metrics()


@cache
def settings() -> CheckerSettings:
    return CheckerSettings()


@cache
def checker() -> HealthChecker:
    registry = EndpointRegistry(aws_clients.dynamodb().Table(settings().endpoints_table))
    return HealthChecker(registry, timeout_seconds=settings().probe_timeout_seconds)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    results = checker().run({TaskKind.IMAGE: settings().image_endpoint_urls})
    healthy = sum(1 for r in results if r.healthy)
    for result in results:
        if not result.healthy:
            logger.warning("endpoint unhealthy", extra=result.model_dump())
    metrics.add_dimension(name="Kind", value=TaskKind.IMAGE.value)
    metrics.add_metric(name="HealthyEndpoints", unit=MetricUnit.Count, value=healthy)
    logger.info("health check done", extra={"checked": len(results), "healthy": healthy})
    return {"checked": len(results), "healthy": healthy}
