"""Scheduled: sync declared GPU endpoints into the health table and probe every endpoint."""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.fleet.endpoint_declarations import read_declarations
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.health_check import HealthChecker
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.models import TaskKind
from gpuqueue.observability import Observability
from gpuqueue.settings import CheckerSettings

observed = Observability()
logger = observed.logger


@cache
def settings() -> CheckerSettings:
    return CheckerSettings()


@cache
def registry() -> EndpointRegistry:
    return EndpointRegistry(aws_clients.dynamodb().Table(settings().endpoints_table))


@cache
def checker() -> HealthChecker:
    config = settings()
    credentials = GpuCredentials(
        config.credential_scope,
        secrets=aws_clients.secretsmanager,
        parameters=aws_clients.ssm,
        ttl_seconds=config.gpu_credential_ttl_seconds,
    )
    return HealthChecker(
        registry(), timeout_seconds=config.probe_timeout_seconds, credentials=credentials
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    config = settings()
    declared = read_declarations(
        urls={
            TaskKind.IMAGE: config.image_endpoint_urls,
            TaskKind.SPEECH: config.speech_endpoint_urls,
        },
        entries={TaskKind.IMAGE: config.image_endpoints, TaskKind.SPEECH: config.speech_endpoints},
        scope=config.credential_scope,
    )
    refused = [error for declaration in declared.values() for error in declaration.errors]
    for error in refused:
        # Each run says it again until the parameter is fixed; the good entries still count.
        logger.error(
            "endpoint declaration refused",
            extra={
                "parameter": error.parameter,
                "entry": error.entry,
                "endpoint_id": error.endpoint_id,
                "field": error.field,
                "error": str(error),
            },
        )
    report = checker().check(
        declared,
        rounds=config.rounds_per_run,
        period_seconds=config.health_check_period_seconds,
        remaining_seconds=lambda: context.get_remaining_time_in_millis() / 1000,
    )
    results = report.results
    for result in results:
        if not result.healthy:
            logger.warning("endpoint unhealthy", extra=result.model_dump())
    for kind, fleet in report.fleets.items():
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
    summary = {"checked": len(results), "healthy": total_healthy}
    if refused:
        summary["refused"] = len(refused)
    logger.info("health check done", extra=summary)
    return summary
