"""The priority lane: vip and admin users' `"priority":"high"` tasks go to their own queue
and their own dispatcher; everyone else asking for it gets 403."""

from __future__ import annotations

import uuid

import boto3

from gpuqueue.endpoint_registry import EndpointRegistry
from gpuqueue.models import TaskKind


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
