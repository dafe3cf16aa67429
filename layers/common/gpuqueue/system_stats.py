"""System stats in the seed's shape, from the queues' own attributes (no table scans)."""

from __future__ import annotations

from gpuqueue.models import QueueStats
from gpuqueue.task_queue import TaskQueue


def queue_stats(
    queue: TaskQueue, dead_letter: TaskQueue, *, capacity: int, workers: int
) -> QueueStats:
    depth = queue.depth()
    dlq = dead_letter.depth()
    return QueueStats(
        queue_length=depth.queued,
        queue_capacity=capacity,
        queue_usage=round(100.0 * depth.queued / capacity, 2),
        in_flight=depth.in_flight,
        delayed=depth.delayed,
        dead_letter=dlq.waiting + dlq.in_flight + dlq.delayed,
        workers=workers,
    )
