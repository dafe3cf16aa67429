"""The fleet benchmark's yardstick: the optimal makespan it compares each run with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from bench_fleet import first_full, handoff_gaps, optimal_makespan


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


def test_handoff_gaps_are_each_slots_idle_time_between_a_call_and_the_next() -> None:
    # Two slots: calls end at 4.0 and 4.1; the next ones start at 4.02 and 4.6; the last
    # call's end (8.0) opens no gap, the run is over.
    changes = [[0.0, 1], [0.1, 2], [4.0, 1], [4.02, 2], [4.1, 1], [4.6, 2], [8.0, 1], [8.1, 0]]

    gaps = handoff_gaps(changes)

    assert [round(g, 3) for g in gaps] == [0.02, 0.5]


def test_every_slot_busy_after_is_when_the_endpoint_first_ran_at_capacity() -> None:
    changes = [[10.5, 1], [10.9, 2], [11.4, 3], [14.0, 2], [14.1, 3]]

    assert first_full(changes, 3, started=10.0) == pytest.approx(1.4)
    assert first_full(changes, 4, started=10.0) is None
