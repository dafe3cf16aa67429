"""Scheduled: sync declared GPU endpoints into the health table and probe every endpoint."""

from __future__ import annotations

import time
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.endpoint_registry import EndpointRegistry
from gpuqueue.health_check import HealthChecker, fleet_health
from gpuqueue.models import TaskKind
from gpuqueue.settings import CheckerSettings

logger = Logger()
tracer = Tracer()


@cache
def settings() -> CheckerSettings:
    return CheckerSettings()


@cache
def registry() -> EndpointRegistry:
    return EndpointRegistry(aws_clients.dynamodb().Table(settings().endpoints_table))


@cache
def checker() -> HealthChecker:
    return HealthChecker(registry(), timeout_seconds=settings().probe_timeout_seconds)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    config = settings()
    results = checker().run(
        {
            TaskKind.IMAGE: config.image_endpoint_urls,
            TaskKind.SPEECH: config.speech_endpoint_urls,
        },
        rounds=config.rounds_per_run,
        period_seconds=config.health_check_period_seconds,
        remaining_seconds=lambda: context.get_remaining_time_in_millis() / 1000,
    )
    for result in results:
        if not result.healthy:
            logger.warning("endpoint unhealthy", extra=result.model_dump())
    for kind in TaskKind:
        fleet = fleet_health(registry().endpoints(kind), time.time())
        # Two figures per kind (dimension Kind): the healthy-endpoints alarm fires when fewer
        # are healthy than min(2, active).
        with single_metric(
            name="HealthyEndpoints", unit=MetricUnit.Count, value=fleet.healthy
        ) as metric:
            metric.add_dimension(name="Kind", value=kind.value)
        with single_metric(
            name="ActiveEndpoints", unit=MetricUnit.Count, value=fleet.active
        ) as metric:
            metric.add_dimension(name="Kind", value=kind.value)
    total_healthy = sum(1 for r in results if r.healthy)
    logger.info("health check done", extra={"checked": len(results), "healthy": total_healthy})
    return {"checked": len(results), "healthy": total_healthy}
