"""The fleet benchmark's yardstick: the optimal makespan it compares each run with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench_fleet import optimal_makespan


@pytest.mark.parametrize(
    ("tasks", "latencies", "capacity", "optimal"),
    [
        # The default scenario: at 44 s the fast endpoints finished 11 rounds, the slow 3.
        (100, (4.0, 4.0, 12.0), 4, 44.0),
        (300, (4.0, 4.0, 12.0), 4, 132.0),
        (10, (3.0,), 2, 15.0),  # 5 rounds of 2
        (1, (5.0, 2.0), 1, 2.0),  # one task: the fastest endpoint's latency
        (3, (5.0, 2.0), 1, 5.0),  # 2 s: 1 done; 4 s: 2; 5 s: 3 (the slow one helps)
    ],
)
def test_the_optimal_makespan_is_the_least_time_the_slots_can_finish_every_task(
    tasks: int, latencies: tuple[float, ...], capacity: int, optimal: float
) -> None:
    assert optimal_makespan(tasks, latencies, capacity) == optimal
