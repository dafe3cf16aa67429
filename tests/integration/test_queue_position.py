"""Queue position and ETA on QUEUED tasks (estimates, O(1) per request), and
`Prefer: wait=N` on submit and status."""

from __future__ import annotations

import time

import boto3
import pytest

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.intake.queue_position import (
    GAP_ROUNDS,
    GAP_WINDOW,
    LaneState,
    QueuePositions,
    departure_time,
)
from gpuqueue.models import Priority, TaskKind
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import ONE_USER_MAY_FILL_THE_QUEUE, RacingTable


def _status(h, user, task_id, headers=None):
    return h.get_task(user, task_id, headers=headers)


def _position(h, user, task_id):
    return _status(h, user, task_id).json().get("queue_position")


def test_queue_position_counts_the_tasks_ahead_and_falls_to_0_as_the_queue_drains(
    make_stack, alice
):
    h = make_stack()
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(5)]

    assert [_position(h, alice, t) for t in ids] == [0, 1, 2, 3, 4]

    h.run_checker()
    last = ids[-1]
    seen = []
    # 60 s per invocation: no room for a second 120 s call, so each delivery runs one task
    # (a worker with time to spare would take the next ones itself) and the line moves by one.
    for _ in range(4):
        h.deliver(h.receive(), timeout_seconds=60)
        h.pump_task_events()  # the stream counts the task that left the waiting line
        seen.append(_position(h, alice, last))
    assert seen == [3, 2, 1, 0]
    h.deliver(h.receive(), timeout_seconds=60)
    task = _status(h, alice, last).json()
    assert task["status"] == "DONE"
    assert "queue_position" not in task or task["queue_position"] is None


def test_a_cancel_before_it_runs_moves_the_tasks_behind_up(make_stack, alice):
    h = make_stack()
    first, second, third = (h.submit(alice).json()["task_id"] for _ in range(3))
    assert h.cancel(alice, first).status == 200

    h.pump_task_events()

    assert [_position(h, alice, t) for t in (second, third)] == [0, 1]


def test_lanes_keep_their_own_positions(make_stack, alice, vip):
    h = make_stack()
    for _ in range(3):
        h.submit(alice)

    vip_task = h.submit(vip, {"prompt": "first", "priority": "high"}).json()["task_id"]

    assert _position(h, vip, vip_task) == 0


def test_the_eta_is_the_queue_ahead_times_the_measured_gap_between_departures(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=0.3)])
    h.run_checker()
    # Three tasks measure the endpoint's call time and the lane's gap between departures.
    for _ in range(3):
        h.submit(alice)
    h.drain()
    h.pump_task_events()
    lane = boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable"))
    gap = float(lane.get_item(Key={"pk": "lane#normal"})["Item"]["gap_seconds"])
    ids = [h.submit(alice, {"prompt": f"q{i}"}).json()["task_id"] for i in range(4)]

    tasks = [_status(h, alice, t).json() for t in ids]

    assert [t["queue_position"] for t in tasks] == [0, 1, 2, 3]
    # One at a time here: a departure every call (0.3 s) plus the work around it.
    assert gap >= 0.3
    # The first task's ETA is one call of its own: the endpoint's measured call time.
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    fleet = registry.fleet(TaskKind.IMAGE)
    [endpoint] = registry.endpoints(TaskKind.IMAGE)
    measured = fleet.service_seconds(endpoint)
    assert measured is not None
    assert measured >= 0.3
    own_call = tasks[0]["eta_seconds"]
    assert own_call == pytest.approx(measured, abs=0.051)
    assert [t["eta_seconds"] for t in tasks] == pytest.approx(
        [own_call + p * gap for p in range(4)], abs=0.11
    )


def test_no_eta_before_any_call_time_is_measured(make_stack, alice):
    h = make_stack()
    task_id = h.submit(alice).json()["task_id"]

    task = _status(h, alice, task_id).json()

    assert task["queue_position"] == 0
    assert task["eta_seconds"] is None


def test_prefer_wait_on_status_returns_at_once_for_a_final_task(make_stack, alice):
    h = make_stack()
    task_id = h.submit(alice).json()["task_id"]
    h.cancel(alice, task_id)
    started = time.monotonic()

    answer = _status(h, alice, task_id, headers={"Prefer": "wait=20"})

    assert time.monotonic() - started < 5
    assert answer.status == 200
    assert answer.json()["status"] == "CANCELED"
    assert answer.headers["preference-applied"] == "wait=20"


def test_prefer_wait_gives_up_after_n_seconds_and_answers_as_usual(make_stack, alice):
    h = make_stack()  # nothing dispatches: the task stays QUEUED
    started = time.monotonic()

    answer = h.call(
        "submit_handler",
        "POST",
        "/api/v1/image/async",
        body={"prompt": "slow"},
        user=alice,
        headers={"Prefer": "respond-async, wait=1"},
    )

    waited = time.monotonic() - started
    assert 1.0 <= waited < 4
    assert answer.status == 202
    assert answer.json()["status"] == "QUEUED"
    assert answer.headers["preference-applied"] == "wait=1"


@pytest.mark.parametrize("prefer", ["wait=abc", "wait=-3", "return=minimal", ""])
def test_a_prefer_header_without_a_usable_wait_is_ignored(make_stack, alice, prefer):
    h = make_stack()

    answer = h.call(
        "submit_handler",
        "POST",
        "/api/v1/image/async",
        body={"prompt": "p"},
        user=alice,
        headers={"Prefer": prefer},
    )

    assert answer.status == 202
    assert "preference-applied" not in answer.headers


def test_submit_and_status_answers_name_the_push_url(make_stack, alice):
    h = make_stack()

    submitted = h.submit(alice)
    status = _status(h, alice, submitted.json()["task_id"])

    assert submitted.headers["x-push-url"].startswith("wss://")
    assert status.headers["x-push-url"] == submitted.headers["x-push-url"]


# --- departures counted concurrently: the lane row's optimistic writes ----------------------
# Several TaskEventsFunction invocations (one per stream shard) count departures from one
# lane row; each times its departure against the last one recorded, and writes only if the
# row is still as it read it.


def _lane_table(h):
    return boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable"))


def _lane_with_waiting_tasks(h, alice, count: int) -> list[str]:
    """`count` tasks queued in the normal lane (tickets 1..count), nothing departed yet."""
    return [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(count)]


def test_a_departure_written_meanwhile_is_counted_and_ours_timed_against_it(make_stack, alice):
    h = make_stack(endpoints=[], parameters=ONE_USER_MAY_FILL_THE_QUEUE)
    ids = _lane_with_waiting_tasks(h, alice, 6)
    positions = QueuePositions(_lane_table(h))
    positions.left(Priority.NORMAL, at=1000.0)
    # Another shard's departure (at 1002) lands between our read of the row and our write.
    racing = RacingTable(_lane_table(h)).race(
        lambda: positions.left(Priority.NORMAL, at=1002.0), None
    )

    QueuePositions(racing).left(Priority.NORMAL, at=1003.0)

    assert racing.pending == 0
    # Three departures counted, and timed in order: 2 s, then our 1 s apart.
    lane = positions.lane(Priority.NORMAL)
    assert lane.left == 3
    assert lane.gap_seconds == pytest.approx(1.5)
    assert _position(h, alice, ids[-1]) == 2


def test_departures_in_bunches_measure_the_fleets_pace_wherever_it_is_read(make_stack, alice):
    # Two slots of 1 s calls: tasks leave in pairs, 0.05 s then 0.95 s apart. Read after a
    # short gap or a long one, the gap is the pace the line drains at (0.5 s a task); a
    # moving average of single gaps (the EWMA this replaced) said 0.42 s or 0.58 s.
    h = make_stack(endpoints=[], parameters=ONE_USER_MAY_FILL_THE_QUEUE)
    positions = QueuePositions(_lane_table(h))
    for _ in range(40):
        positions.take_ticket(Priority.NORMAL)
    times = [1000.0 + pair + offset for pair in range(12) for offset in (0.0, 0.05)]

    seen = []
    for at in times:
        positions.left(Priority.NORMAL, at=at)
        seen.append(positions.lane(Priority.NORMAL).gap_seconds)

    # Once the window holds eight pairs, every reading is within 7 % of 0.5 s.
    assert all(gap == pytest.approx(0.5, rel=0.07) for gap in seen[15:]), seen[15:]


def test_the_gap_leaves_idle_time_out_and_keeps_the_last_32(make_stack, alice):
    h = make_stack(endpoints=[])
    positions = QueuePositions(_lane_table(h))
    for _ in range(2):
        positions.take_ticket(Priority.NORMAL)
    positions.left_many(Priority.NORMAL, [1000.0, 1004.0])  # 4 s apart; the line is empty
    for _ in range(3):
        positions.take_ticket(Priority.NORMAL)
    # After 50 s of idleness a busy line again: a departure a second.
    positions.left_many(Priority.NORMAL, [1054.0, 1055.0, 1056.0])

    # The busy gaps before the line emptied still count; the idle 50 s does not.
    assert positions.lane(Priority.NORMAL).gap_seconds == pytest.approx((4 + 1 + 1) / 3)

    for _ in range(GAP_WINDOW):
        positions.take_ticket(Priority.NORMAL)
    positions.left_many(Priority.NORMAL, [1057.0 + i for i in range(GAP_WINDOW)])

    # The window keeps the last 32 gaps: the old 4 s has left it.
    item = _lane_table(h).get_item(Key={"pk": "lane#normal"})["Item"]
    assert positions.lane(Priority.NORMAL).gap_seconds == pytest.approx(1.0)
    assert len(item["recent_gaps"]) == GAP_WINDOW


def test_a_departure_that_keeps_losing_the_race_is_still_counted(make_stack, alice):
    h = make_stack(endpoints=[], parameters=ONE_USER_MAY_FILL_THE_QUEUE)
    ids = _lane_with_waiting_tasks(h, alice, 8)
    positions = QueuePositions(_lane_table(h))
    positions.left(Priority.NORMAL, at=1000.0)
    # Every round of ours (GAP_ROUNDS of them) loses to another departure, 2 s apart.
    others = [1000.0 + 2 * (i + 1) for i in range(GAP_ROUNDS)]
    racing = RacingTable(_lane_table(h)).race(
        *(lambda at=at: positions.left(Priority.NORMAL, at=at) for at in others)
    )

    QueuePositions(racing).left(Priority.NORMAL, at=others[-1] + 1.0)

    assert racing.pending == 0
    lane = positions.lane(Priority.NORMAL)
    assert lane.left == 1 + GAP_ROUNDS + 1  # ours is counted all the same...
    assert lane.gap_seconds == pytest.approx(2.0)  # ...and only its timing is given up
    assert _position(h, alice, ids[-1]) == len(ids) - lane.left - 1


def test_a_departure_older_than_the_last_recorded_is_counted_but_not_timed(make_stack, alice):
    # Stream records of different tasks come through different shards, so a departure can
    # be counted after a later one.
    h = make_stack(endpoints=[], parameters=ONE_USER_MAY_FILL_THE_QUEUE)
    ids = _lane_with_waiting_tasks(h, alice, 5)
    positions = QueuePositions(_lane_table(h))
    positions.left(Priority.NORMAL, at=1000.0)
    positions.left(Priority.NORMAL, at=1004.0)
    before = _lane_table(h).get_item(Key={"pk": "lane#normal"})["Item"]

    positions.left(Priority.NORMAL, at=1001.0)

    after = _lane_table(h).get_item(Key={"pk": "lane#normal"})["Item"]
    assert after["left"] == before["left"] + 1
    assert after["gap_seconds"] == before["gap_seconds"] == 4  # no negative gap folded in
    assert after["last_left_at"] == before["last_left_at"] == 1004
    assert _position(h, alice, ids[-1]) == 5 - 3 - 1


def test_a_departure_without_a_readable_time_is_counted_without_timing(make_stack, alice):
    h = make_stack(endpoints=[], parameters=ONE_USER_MAY_FILL_THE_QUEUE)
    ids = _lane_with_waiting_tasks(h, alice, 3)
    positions = QueuePositions(_lane_table(h))

    positions.left(Priority.NORMAL, at=departure_time("not a timestamp"))

    assert positions.lane(Priority.NORMAL) == LaneState(left=1, gap_seconds=None)
    assert _position(h, alice, ids[-1]) == 1
