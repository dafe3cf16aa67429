"""System stats in the seed's shape, from the queues' attributes and one query per kind."""

from __future__ import annotations

import time

from gpuqueue.endpoint_registry import EndpointRegistry
from gpuqueue.models import FleetStats, QueueStats, TaskKind
from gpuqueue.task_queue import TaskQueue


def fleet_stats(
    registry: EndpointRegistry, kind: TaskKind, *, max_age_seconds: float
) -> FleetStats:
    now = time.time()
    fleet = registry.fleet(kind)
    routable = fleet.routable(now, max_age_seconds)
    return FleetStats(
        healthy=len(routable),
        total=len(fleet.endpoints),
        slots_total=sum(e.usable_capacity for e in routable),
        slots_free=sum(len(fleet.free_slots(e, now)) for e in routable),
    )


def queue_stats(
    queue: TaskQueue,
    dead_letter: TaskQueue,
    *,
    capacity: int,
    workers: int,
    registry: EndpointRegistry | None = None,
    health_max_age_seconds: float = 90.0,
) -> QueueStats:
    depth = queue.depth()
    dlq = dead_letter.depth()
    endpoints = {}
    if registry is not None:
        endpoints = {
            kind.value: fleet_stats(registry, kind, max_age_seconds=health_max_age_seconds)
            for kind in TaskKind
        }
    return QueueStats(
        queue_length=depth.queued,
        queue_capacity=capacity,
        queue_usage=round(100.0 * depth.queued / capacity, 2),
        in_flight=depth.in_flight,
        delayed=depth.delayed,
        dead_letter=dlq.waiting + dlq.in_flight + dlq.delayed,
        workers=workers,
        endpoints=endpoints,
    )
