"""System stats in the seed's shape, from the queues' attributes and one query per kind."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.lifecycle.outcome_counters import OutcomeCounters
from gpuqueue.models import FleetStats, LaneStats, Priority, QueueStats, TaskKind
from gpuqueue.store.task_queue import TaskQueue


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


@dataclass(frozen=True)
class Lane:
    """A lane's queue, its dead-letter queue and its dispatcher's worker count."""

    queue: TaskQueue
    dead_letter: TaskQueue
    workers: int


def lane_stats(lane: Lane, *, capacity: int) -> LaneStats:
    depth = lane.queue.depth()
    return LaneStats(
        queue_length=depth.queued,
        queue_capacity=capacity,
        queue_usage=round(100.0 * depth.queued / capacity, 2),
        in_flight=depth.in_flight,
        delayed=depth.delayed,
        dead_letter=lane.dead_letter.depth().total,
        workers=lane.workers,
    )


def queue_stats(
    lanes: dict[Priority, Lane],
    *,
    capacity: int,
    registry: EndpointRegistry | None = None,
    health_max_age_seconds: float = 90.0,
    outcomes: OutcomeCounters | None = None,
) -> QueueStats:
    """Each lane from its queues' attributes (2 GetQueueAttributes a lane), each kind's
    fleet from one query, the last hour's outcomes from one BatchGetItem: no scans,
    whatever the number of tasks."""
    by_lane = {
        priority.value: lane_stats(lane, capacity=capacity) for priority, lane in lanes.items()
    }
    normal = by_lane[Priority.NORMAL.value]
    endpoints = {}
    if registry is not None:
        endpoints = {
            kind.value: fleet_stats(registry, kind, max_age_seconds=health_max_age_seconds)
            for kind in TaskKind
        }
    return QueueStats(
        **normal.model_dump(),
        lanes=by_lane,
        endpoints=endpoints,
        last_hour=outcomes.last_hour(time.time()) if outcomes is not None else None,
    )
