"""The priority lane: vip and admin users' `"priority":"high"` tasks go to their own queue
and their own dispatcher; everyone else asking for it gets 403. The lane holds at most
`PriorityLaneWorkers` slots of a kind (its seats), however many workers its dispatcher runs."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import boto3
import pytest

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.slot_broker import HeldSlot, NoFreeSlot, SlotBroker, SlotRequest
from gpuqueue.models import Priority, TaskKind


def _depth(h, lane: str) -> int:
    attrs = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.queue_url(lane), AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def test_a_user_outside_vip_and_admin_asking_for_high_priority_gets_403(make_stack, alice):
    h = make_stack()

    refused = h.submit(alice, {"prompt": "me first", "priority": "high"})

    assert refused.status == 403
    assert refused.json()["field"] == "priority"
    assert _depth(h, "normal") == _depth(h, "high") == 0
    listed = h.call("tasks_handler", "GET", "/api/v1/tasks", user=alice).json()
    assert listed == []


def test_a_vip_task_goes_to_the_priority_queue_and_its_own_dispatcher(make_stack, vip):
    h = make_stack()
    h.run_checker()

    accepted = h.submit(vip, {"prompt": "me first", "priority": "high"})

    assert accepted.status == 202
    task_id = accepted.json()["task_id"]
    assert h.get_task(vip, task_id).json()["priority"] == "high"
    assert _depth(h, "normal") == 0
    messages = h.receive(lane="high")
    assert len(messages) == 1
    assert h.deliver(messages, lane="high") == []
    assert h.get_task(vip, task_id).json()["status"] == "DONE"


def test_admins_may_use_the_priority_lane_and_normal_is_the_default(make_stack, operator, vip):
    h = make_stack()

    assert h.submit(operator, {"prompt": "ops", "priority": "high"}).status == 202
    assert h.submit(vip, {"prompt": "no hurry"}).status == 202

    assert (_depth(h, "high"), _depth(h, "normal")) == (1, 1)


def test_an_unknown_priority_is_a_400_naming_the_field(make_stack, vip):
    h = make_stack()

    refused = h.submit(vip, {"prompt": "p", "priority": "urgent"})

    assert refused.status == 400
    assert refused.json()["field"] == "priority"


def test_a_high_priority_idempotent_submit_is_still_authorised(make_stack, alice, vip):
    h = make_stack()
    body = {"prompt": "keyed", "priority": "high"}
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}

    refused = h.call(
        "submit_handler", "POST", "/api/v1/image/async", body=body, user=alice, headers=key
    )
    first = h.call(
        "submit_handler", "POST", "/api/v1/image/async", body=body, user=vip, headers=key
    )
    again = h.call(
        "submit_handler", "POST", "/api/v1/image/async", body=body, user=vip, headers=key
    )

    assert refused.status == 403
    assert first.status == again.status == 202
    assert first.json()["task_id"] == again.json()["task_id"]
    assert _depth(h, "high") == 1


def test_long_audio_with_high_priority_is_queued_on_the_priority_lane(make_stack, vip):
    h = make_stack()
    announced = h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/async",
        body={"filename": "talk.wav", "size_bytes": 44, "priority": "high"},
        user=vip,
    )
    assert announced.status == 202
    task_id = announced.json()["task_id"]
    boto3.client("s3").put_object(
        Bucket=h.stack.ref("ImagesBucket"), Key=f"audio/{task_id}", Body=b"\0" * 44
    )

    assert h.audio_uploaded(f"audio/{task_id}", 44) == {"queued": True}

    assert (_depth(h, "high"), _depth(h, "normal")) == (1, 0)


def test_a_waiting_high_priority_task_is_in_the_fleet_read_but_not_an_endpoint(make_stack):
    h = make_stack()
    h.run_checker()
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    before = registry.endpoints(TaskKind.IMAGE)

    registry.wait_with_priority(TaskKind.IMAGE, "vip-task", until=4_000_000_000.0)
    fleet = registry.fleet(TaskKind.IMAGE)

    assert fleet.endpoints == before
    assert fleet.waiting_priority(now=3_999_999_999.0) == 1
    assert fleet.waiting_priority(now=4_000_000_001.0) == 0
    assert registry.get("image#waiter#vip-task") is None
    registry.stop_waiting(TaskKind.IMAGE, "vip-task")
    assert registry.fleet(TaskKind.IMAGE).priority_waiters == {}


# --- the lane's cap: at most PriorityLaneWorkers slots of a kind ---------------------------


def _registry(h) -> EndpointRegistry:
    return EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))


def _with_slots(h, capacity: int) -> None:
    """The stand-in's registered slots, as an operator sets them."""
    registry = _registry(h)
    (endpoint,) = registry.endpoints(TaskKind.IMAGE)
    registry.put(endpoint.model_copy(update={"capacity": capacity}))


def _lane_broker(h) -> SlotBroker:
    """A slot broker as the priority lane's dispatcher builds one: the cap is the template's
    PRIORITY_LANE_SLOTS (PriorityLaneWorkers) for that function."""
    cap = int(h.stack.function_env("PriorityDispatcherFunction")["PRIORITY_LANE_SLOTS"])
    return SlotBroker(
        _registry(h), health_max_age_seconds=90, poll_seconds=0.02, priority_lane_slots=cap
    )


def _slot(task_id: str, priority: Priority, *, wait: float = 0.0) -> SlotRequest:
    return SlotRequest(
        kind=TaskKind.IMAGE,
        task_id=task_id,
        user_id="u",
        lease_seconds=60,
        wait_seconds=wait,
        priority=priority,
    )


def test_a_one_slot_lane_holds_one_of_two_slots_and_normal_work_gets_the_other(make_stack):
    h = make_stack()  # PriorityLaneWorkers: the default, 1
    h.run_checker()
    _with_slots(h, 2)
    broker = _lane_broker(h)

    first = broker.acquire(_slot("vip-1", Priority.HIGH))
    # The lane's second worker: a slot is free, but the lane holds its one already.
    with pytest.raises(NoFreeSlot):
        broker.acquire(_slot("vip-2", Priority.HIGH, wait=0.3))
    normal = broker.acquire(_slot("normal-1", Priority.NORMAL))

    assert normal.lease.task_id == "normal-1"
    first.release(call_seconds=1.0)
    normal.release(call_seconds=1.0)
    assert broker.acquire(_slot("vip-2", Priority.HIGH)).lease.task_id == "vip-2"


def test_two_lane_workers_racing_for_its_one_slot_never_both_win(make_stack):
    h = make_stack()
    h.run_checker()
    _with_slots(h, 3)  # slots to spare: only the lane's cap can stop the second
    broker = _lane_broker(h)
    rounds = 12
    barrier = threading.Barrier(2)
    won: list[list[HeldSlot]] = [[] for _ in range(rounds)]

    def worker(name: str) -> None:
        for i in range(rounds):
            barrier.wait(timeout=30)
            with contextlib.suppress(NoFreeSlot):  # the other worker won this round
                won[i].append(broker.acquire(_slot(f"{name}-{i}", Priority.HIGH)))
            barrier.wait(timeout=30)
            for held in won[i]:
                if held.lease.task_id.startswith(name):
                    held.release()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert [len(winners) for winners in won] == [1] * rounds


def test_a_vip_task_waits_while_the_lane_is_full_spending_no_attempt_and_normal_work_runs(
    make_stack, vip, alice
):
    h = make_stack(env={"SLOT_WAIT_SECONDS": "0"})
    h.run_checker()
    _with_slots(h, 2)
    registry = _registry(h)
    # Another VIP call holds the lane's one seat (its slot does not matter here).
    seat = registry.take_priority_seat(
        TaskKind.IMAGE, 0, task_id="other-vip", lease_seconds=60, now=time.time()
    )
    assert seat is not None
    vip_task = h.submit(vip, {"prompt": "me first", "priority": "high"}).json()["task_id"]
    normal_task = h.submit(alice, {"prompt": "beside it"}).json()["task_id"]

    h.deliver(h.receive(lane="high"), lane="high")
    h.drain()

    assert h.get_task(vip, vip_task).json()["status"] == "QUEUED"
    assert h.task_row(vip_task)["attempt"] == 0
    assert h.get_task(alice, normal_task).json()["status"] == "DONE"
    registry.release_slot(seat)
    h.deliver(h.receive(lane="high"), lane="high")
    assert h.get_task(vip, vip_task).json()["status"] == "DONE"
