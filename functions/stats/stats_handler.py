"""GET /api/v1/system/stats: the seed's queue figures from the queues' attributes, the
endpoints, and the last hour's outcomes from sharded rolling counters."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.resolver import build_resolver, current_caller
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.system_stats import Lane, queue_stats
from gpuqueue.lifecycle.outcome_counters import OutcomeCounters
from gpuqueue.models import Priority, QueueStats
from gpuqueue.observability import Observability
from gpuqueue.settings import StatsSettings
from gpuqueue.store.task_queue import TaskQueue

observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
app = build_resolver()


@dataclass(frozen=True)
class Deps:
    lanes: dict[Priority, Lane]
    registry: EndpointRegistry
    outcomes: OutcomeCounters | None
    settings: StatsSettings


@cache
def deps() -> Deps:
    settings = StatsSettings()
    sqs = aws_clients.sqs()
    lanes = {
        Priority.NORMAL: Lane(
            queue=TaskQueue(sqs, settings.task_queue_url),
            dead_letter=TaskQueue(sqs, settings.dead_letter_queue_url),
            workers=settings.worker_pool_size,
        )
    }
    if settings.priority_queue_url and settings.priority_dead_letter_queue_url:
        lanes[Priority.HIGH] = Lane(
            queue=TaskQueue(sqs, settings.priority_queue_url),
            dead_letter=TaskQueue(sqs, settings.priority_dead_letter_queue_url),
            workers=settings.priority_lane_workers,
        )
    outcomes = None
    if settings.limits_table:
        outcomes = OutcomeCounters(
            aws_clients.dynamodb().Table(settings.limits_table),
            shards=settings.outcome_counter_shards,
        )
    return Deps(
        lanes=lanes,
        registry=EndpointRegistry(aws_clients.dynamodb().Table(settings.endpoints_table)),
        outcomes=outcomes,
        settings=settings,
    )


@app.get("/api/v1/system/stats")
def get_stats() -> QueueStats:
    current_caller(app)
    d = deps()
    return queue_stats(
        d.lanes,
        capacity=d.settings.queue_capacity,
        registry=d.registry,
        health_max_age_seconds=d.settings.health_max_age_seconds,
        outcomes=d.outcomes,
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
