"""GET /api/v1/system/stats and the scheduled checker's health table."""

from __future__ import annotations

import time

import boto3

from gpuqueue.fleet.endpoint_registry import EndpointRegistry, endpoint_id_for
from gpuqueue.models import TaskKind
from gpuqueue_local.standins.image_server import ImageServerKnobs


def _stats(h, user):
    return h.call("stats_handler", "GET", "/api/v1/system/stats", user=user)


def test_stats_report_the_seed_fields_from_the_queue(make_stack, alice):
    h = make_stack(parameters={"QueueCapacity": "40", "WorkerPoolSize": "3"})
    for _ in range(3):
        h.submit(alice)
    response = _stats(h, alice)
    assert response.status == 200
    assert response.json() == {
        "queue_length": 3,
        "queue_capacity": 40,
        "queue_usage": 7.5,
        "in_flight": 0,
        "delayed": 0,
        "dead_letter": 0,
        "workers": 3,
        "lanes": {
            "normal": {
                "queue_length": 3,
                "queue_capacity": 40,
                "queue_usage": 7.5,
                "in_flight": 0,
                "delayed": 0,
                "dead_letter": 0,
                "workers": 3,
            },
            "high": {
                "queue_length": 0,
                "queue_capacity": 40,
                "queue_usage": 0.0,
                "in_flight": 0,
                "delayed": 0,
                "dead_letter": 0,
                "workers": 1,
            },
        },
        # The checker has not run yet: the declared endpoint is not in the table.
        "endpoints": {
            "image": {"healthy": 0, "total": 0, "slots_total": 0, "slots_free": 0},
            "speech": {"healthy": 0, "total": 0, "slots_total": 0, "slots_free": 0},
        },
        # Nothing has ended yet.
        "last_hour": {
            "window_seconds": 3600,
            "succeeded": 0,
            "failed": 0,
            "canceled": 0,
            "expired": 0,
            "failure_rate": 0.0,
            "avg_processing_seconds": None,
        },
    }


def test_stats_report_endpoints_and_free_slots_per_kind(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(), ImageServerKnobs(healthy=False)])
    h.run_checker()
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    first = next(e for e in registry.endpoints(TaskKind.IMAGE) if e.healthy)
    registry.put(first.model_copy(update={"capacity": 3}))
    lease = registry.take_slot(first, 0, task_id="t", lease_seconds=60, now=time.time())
    assert lease is not None
    image = _stats(h, alice).json()["endpoints"]["image"]
    assert image == {"healthy": 1, "total": 2, "slots_total": 3, "slots_free": 2}


def test_stats_count_in_flight_and_dead_lettered_messages(make_stack, alice):
    h = make_stack()
    h.submit(alice)
    h.submit(alice)
    assert len(h.receive()) == 1  # one taken by a worker, not yet finished
    boto3.client("sqs").send_message(QueueUrl=h.stack.ref("TaskDeadLetterQueue"), MessageBody="{}")
    stats = _stats(h, alice).json()
    assert stats["queue_length"] == 1
    assert stats["in_flight"] == 1
    assert stats["dead_letter"] == 1


def test_stats_need_an_identity(make_stack):
    h = make_stack()
    assert h.call("stats_handler", "GET", "/api/v1/system/stats").status == 401


def test_checker_syncs_the_declared_endpoints_and_drops_removed_ones(make_stack, monkeypatch):
    h = make_stack(endpoints=[ImageServerKnobs(), ImageServerKnobs()])
    first, second = h.image_servers
    h.run_checker()
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    rows = registry.endpoints(TaskKind.IMAGE)
    assert {e.url for e in rows} == {first.url, second.url}
    assert all(e.healthy and e.last_checked_at and e.latency_ms is not None for e in rows)
    assert {e.endpoint_id for e in rows} == {
        endpoint_id_for(TaskKind.IMAGE, first.url),
        endpoint_id_for(TaskKind.IMAGE, second.url),
    }

    # An operator redeploys with one URL fewer: that row goes, the other keeps its health.
    monkeypatch.setenv("IMAGE_ENDPOINT_URLS", first.url + "/")
    import checker_handler  # noqa: PLC0415 - reload its cached settings

    checker_handler.settings.cache_clear()
    checker_handler.checker.cache_clear()
    assert h.run_checker() == {"checked": 1, "healthy": 1}
    assert [e.url for e in registry.endpoints(TaskKind.IMAGE)] == [first.url]


def test_checker_with_no_declared_endpoints_checks_nothing(make_stack):
    h = make_stack(endpoints=[])
    assert h.run_checker() == {"checked": 0, "healthy": 0}


def test_stats_report_each_lanes_queue_and_workers(make_stack, alice, vip):
    h = make_stack(parameters={"WorkerPoolSize": "4", "PriorityLaneWorkers": "2"})
    h.submit(alice)
    for i in range(2):
        h.submit(vip, {"prompt": f"vip {i}", "priority": "high"})
    h.receive(lane="high")  # one high-priority task being worked on

    lanes = _stats(h, alice).json()["lanes"]

    assert lanes["normal"]["queue_length"] == 1
    assert lanes["normal"]["workers"] == 4
    assert lanes["high"]["queue_length"] == 1
    assert lanes["high"]["in_flight"] == 1
    assert lanes["high"]["workers"] == 2
    assert lanes["high"]["dead_letter"] == 0
