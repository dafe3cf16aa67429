"""The stats' last hour: sharded rolling counters the tasks stream keeps, read in one
BatchGetItem (no Scan)."""

from __future__ import annotations

import time
from typing import Any

import boto3
import pytest

from gpuqueue import aws_clients
from gpuqueue.lifecycle.outcome_counters import WINDOW_SECONDS, OutcomeCounters
from gpuqueue.models import TaskStatus
from gpuqueue.store.limits_rows import LimitsRow
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import dynamodb_operations


def _last_hour(h, user) -> dict[str, Any]:
    response = h.call("stats_handler", "GET", "/api/v1/system/stats", user=user)
    assert response.status == 200, response.body
    last_hour: dict[str, Any] = response.json()["last_hour"]
    return last_hour


def test_stats_count_how_tasks_ended_in_the_last_hour(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=0.2)])
    h.run_checker()
    done = [h.submit(alice, {"prompt": f"done {i}"}).json()["task_id"] for i in range(3)]
    h.drain()
    canceled = h.submit(alice).json()["task_id"]
    assert h.cancel(alice, canceled).status == 200
    h.pump_task_events()

    last_hour = _last_hour(h, alice)

    assert [h.get_task(alice, t).json()["status"] for t in done] == ["DONE"] * 3
    assert {k: last_hour[k] for k in ("succeeded", "failed", "canceled", "expired")} == {
        "succeeded": 3,
        "failed": 0,
        "canceled": 1,
        "expired": 0,
    }
    assert last_hour["window_seconds"] == WINDOW_SECONDS
    assert last_hour["failure_rate"] == 0.0
    # Each run took the stand-in's 0.2 s and a little more.
    assert 0.2 <= last_hour["avg_processing_seconds"] < 5


def test_failed_tasks_raise_the_failure_rate(make_stack, alice):
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0)],
        parameters={"MaxAttempts": "1", "CircuitFailureThreshold": "10"},
    )
    h.run_checker()
    for _ in range(2):
        h.submit(alice)
    h.drain()
    h.pump_task_events()

    last_hour = _last_hour(h, alice)

    assert (last_hour["succeeded"], last_hour["failed"]) == (0, 2)
    assert last_hour["failure_rate"] == 100.0
    assert last_hour["avg_processing_seconds"] is None


@pytest.mark.parametrize("shards", [1, 4, 7])
def test_ends_spread_over_the_shards_and_add_up(make_stack, shards):
    h = make_stack()
    table = boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable"))
    counters = OutcomeCounters(table, shards=shards)
    now = time.time()
    for i in range(60):
        counters.record(f"task-{i}", TaskStatus.DONE, at=now, processing_seconds=2.0)

    rows = [
        item
        for item in table.scan()["Items"]  # the test looks at the rows; the code never scans
        if str(item["pk"]).startswith(LimitsRow.OUTCOMES)
    ]
    stats = counters.last_hour(now)

    assert len(rows) == shards  # one bucket, every shard written
    assert stats.succeeded == 60
    assert stats.avg_processing_seconds == 2.0
    assert all(int(row["expires_at"]) > now + WINDOW_SECONDS for row in rows)


def test_ends_older_than_the_window_drop_out(make_stack):
    h = make_stack()
    counters = OutcomeCounters(boto3.resource("dynamodb").Table(h.stack.ref("LimitsTable")))
    now = time.time()
    counters.record("old", TaskStatus.FAILED, at=now - WINDOW_SECONDS - 600)
    counters.record("recent", TaskStatus.FAILED, at=now - WINDOW_SECONDS + 600)

    assert counters.last_hour(now).failed == 1


def test_a_stats_call_reads_the_counters_in_one_batch_and_never_scans(make_stack, alice):
    h = make_stack()
    h.run_checker()
    h.submit(alice)
    with dynamodb_operations(aws_clients.dynamodb().meta.client) as operations:
        assert _last_hour(h, alice)["succeeded"] == 0

    assert "Scan" not in operations
    # The counters in one BatchGetItem; the endpoints table, one Query per kind.
    assert operations.count("BatchGetItem") == 1
    assert sorted(set(operations)) == ["BatchGetItem", "Query"]
