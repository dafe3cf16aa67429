"""A worker whose GPU call ended keeps its slot and takes the next task itself.

The freed slot goes to the next queued task in one step (no waiter polling the fleet, no
release and re-take), while a whole call still fits in the invocation's time; and it is
handed back when the queue is empty, when a high-priority task waits for a slot, or when the
strategy ties tasks to endpoints.
"""

from __future__ import annotations

import threading
import time

import boto3
import pytest

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.models import TaskKind
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import ONE_USER_MAY_FILL_THE_QUEUE, wait_for


def _queue_counts(h) -> tuple[int, int, int]:
    attrs = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.queue_url(), AttributeNames=["All"]
    )["Attributes"]
    return (
        int(attrs["ApproximateNumberOfMessages"]),
        int(attrs["ApproximateNumberOfMessagesNotVisible"]),
        int(attrs["ApproximateNumberOfMessagesDelayed"]),
    )


def _live_leases(h) -> list:
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    fleet = registry.fleet(TaskKind.IMAGE)
    now = time.time()
    return [lease for e in fleet.endpoints for lease in fleet.live_leases(e.endpoint_id, now)]


def test_one_invocation_runs_the_queued_tasks_one_after_another_on_its_slot(make_stack, alice):
    h = make_stack(env={"TASK_TIMEOUT_SECONDS": "10"})
    h.run_checker()
    ids = [h.submit(alice).json()["task_id"] for _ in range(4)]

    assert h.deliver(h.receive(), timeout_seconds=180) == []

    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 4
    assert h.image_servers[0].stats()["calls"] == 4
    assert h.image_servers[0].stats()["max_in_flight"] == 1
    assert _queue_counts(h) == (0, 0, 0)  # every pulled message deleted once DONE
    assert _live_leases(h) == []  # the slot handed back when the queue ran dry
    # The slot's measured call time survives the hand-offs (what least-loaded reads).
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    fleet = registry.fleet(TaskKind.IMAGE)
    assert fleet.service_seconds(fleet.endpoints[0]) is not None


def test_no_next_task_is_taken_unless_a_whole_call_fits_in_the_time_left(make_stack, alice):
    h = make_stack(env={"TASK_TIMEOUT_SECONDS": "60"})
    h.run_checker()
    ids = [h.submit(alice).json()["task_id"] for _ in range(2)]

    # Under 64 s left after the first call: less than a call (60 s) and the margin (5 s).
    assert h.deliver(h.receive(), timeout_seconds=64) == []

    statuses = sorted(h.get_task(alice, i).json()["status"] for i in ids)
    assert statuses == ["DONE", "QUEUED"]
    assert _queue_counts(h)[0] == 1  # the other message still waits in the queue
    assert _live_leases(h) == []


def test_the_slot_goes_back_when_a_high_priority_task_waits_for_one(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=1.0)], env={"TASK_TIMEOUT_SECONDS": "10"})
    server = h.image_servers[0]
    h.run_checker()
    ids = [h.submit(alice).json()["task_id"] for _ in range(2)]
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    worker = threading.Thread(
        target=h.deliver, args=(h.receive(),), kwargs={"timeout_seconds": 180}
    )
    worker.start()
    wait_for(lambda: server.stats()["in_flight"] == 1, what="the first call on the GPU")

    # Meanwhile a high-priority task starts waiting for a slot (its waiter row).
    registry.wait_with_priority(TaskKind.IMAGE, "vip-task", until=time.time() + 60)
    worker.join(timeout=60)

    statuses = sorted(h.get_task(alice, i).json()["status"] for i in ids)
    assert statuses == ["DONE", "QUEUED"]  # the freed slot is left to the waiter
    assert server.stats()["calls"] == 1
    assert _live_leases(h) == []


@pytest.mark.parametrize("strategy", ["user-hash", "round-robin", "weighted"])
def test_strategies_that_choose_per_task_keep_no_slot(make_stack, alice, strategy):
    h = make_stack(
        endpoints=[ImageServerKnobs(), ImageServerKnobs()],
        # One call per invocation: what is checked is that its slot is not kept.
        env={"TASK_TIMEOUT_SECONDS": "10", "DISPATCH_STRATEGY": strategy, "CALLS_PER_WORKER": "1"},
    )
    h.run_checker()
    ids = [h.submit(alice).json()["task_id"] for _ in range(2)]

    assert h.deliver(h.receive(), timeout_seconds=180) == []

    statuses = sorted(h.get_task(alice, i).json()["status"] for i in ids)
    assert statuses == ["DONE", "QUEUED"]


def test_a_pulled_task_that_fails_for_good_ends_failed_and_the_next_still_runs(make_stack, alice):
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0, fail_status=400)],
        env={"TASK_TIMEOUT_SECONDS": "10"},
    )
    h.run_checker()
    ids = [h.submit(alice).json()["task_id"] for _ in range(3)]

    assert h.deliver(h.receive(), timeout_seconds=180) == []

    tasks = [h.get_task(alice, i).json() for i in ids]
    assert [t["status"] for t in tasks] == ["FAILED"] * 3
    assert all("HTTP 400" in t["error"] for t in tasks)
    assert _queue_counts(h) == (0, 0, 0)


# --- several calls in one invocation (CallsPerWorker) --------------------------------------


def _with_capacity(h, capacity: int) -> None:
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    for endpoint in registry.endpoints(TaskKind.IMAGE):
        registry.put(endpoint.model_copy(update={"capacity": capacity}))


def test_one_invocation_fills_every_free_slot_and_runs_the_backlog_on_them(make_stack, alice):
    h = make_stack(
        parameters=ONE_USER_MAY_FILL_THE_QUEUE,
        endpoints=[
            ImageServerKnobs(latency_s=0.3, capacity=2),
            ImageServerKnobs(latency_s=0.3, capacity=2),
        ],
        env={"TASK_TIMEOUT_SECONDS": "10", "CALLS_PER_WORKER": "4"},
    )
    h.run_checker()
    _with_capacity(h, 2)
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(12)]

    assert h.deliver(h.receive(), timeout_seconds=180) == []

    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 12
    stats = [server.stats() for server in h.image_servers]
    assert sum(s["calls"] for s in stats) == 12  # each task once
    assert [s["max_in_flight"] for s in stats] == [2, 2]  # all four slots, none over
    assert _queue_counts(h) == (0, 0, 0)
    assert _live_leases(h) == []
    images = boto3.client("s3").list_objects_v2(
        Bucket=h.stack.ref("ImagesBucket"), Prefix="results/"
    )
    assert sorted(o["Key"] for o in images.get("Contents", [])) == sorted(
        f"results/{i}.png" for i in ids
    )


def test_calls_per_invocation_never_exceed_calls_per_worker(make_stack, alice):
    h = make_stack(
        parameters=ONE_USER_MAY_FILL_THE_QUEUE,
        endpoints=[ImageServerKnobs(latency_s=0.3, capacity=4)],
        env={"TASK_TIMEOUT_SECONDS": "10", "CALLS_PER_WORKER": "2"},
    )
    h.run_checker()
    _with_capacity(h, 4)
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(6)]

    assert h.deliver(h.receive(), timeout_seconds=180) == []

    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 6
    assert h.image_servers[0].stats()["max_in_flight"] == 2  # 4 slots free, 2 calls at most


def test_workers_whose_calls_end_together_share_one_receive(make_stack, alice, monkeypatch):
    # Calls of 0.8 s: long enough that the four workers, started one after another, all
    # run at once on a loaded machine (0.3 s was not, once); short enough (under twice the
    # receive lead) that each receives after its call, the path measured here.
    h = make_stack(
        parameters=ONE_USER_MAY_FILL_THE_QUEUE,
        endpoints=[ImageServerKnobs(latency_s=0.8, capacity=4)],
        env={"TASK_TIMEOUT_SECONDS": "10", "CALLS_PER_WORKER": "4"},
    )
    h.run_checker()
    _with_capacity(h, 4)
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(16)]
    receives: list[int] = []
    receive = TaskQueue.receive

    def counted(queue: TaskQueue, count: int) -> list[tuple[str, str]]:
        got = receive(queue, count)
        receives.append(len(got))
        return got

    monkeypatch.setattr(TaskQueue, "receive", counted)
    released: list[int] = []
    release = TaskQueue.release

    def recorded(queue: TaskQueue, receipts: list[str]) -> None:
        released.append(len(receipts))
        release(queue, receipts)

    monkeypatch.setattr(TaskQueue, "release", recorded)

    assert h.deliver(h.receive(), timeout_seconds=180) == []

    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 16
    assert h.image_servers[0].stats()["calls"] == 16
    assert h.image_servers[0].stats()["max_in_flight"] == 4
    # 15 messages pulled by the invocation's four workers: one receive each would be 15
    # (and the empty ones that end them); together, several come in one receive.
    assert sum(receives) == 15
    assert len(receives) <= 10, receives
    assert max(receives) > 1
    assert _queue_counts(h) == (0, 0, 0)  # none left hidden: every message deleted
    # Every message received for a worker was taken by it: none went back (a batch of
    # deletes mid-invocation does not hand back what was received for workers due).
    assert released == []
    assert _live_leases(h) == []
