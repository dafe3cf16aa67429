"""POST /api/v1/image/async: validation, capacity, and never an orphaned task."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.exceptions import ClientError

from gpuqueue import aws_clients
from gpuqueue_testing import ONE_USER_MAY_FILL_THE_QUEUE, User


def _queued_messages(h) -> int:
    attrs = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.queue_url(), AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def _task_rows(h) -> list[dict]:
    table = boto3.resource("dynamodb").Table(h.stack.ref("TasksTable"))
    return table.scan()["Items"]


def test_submit_answers_202_with_a_queued_task_owned_by_the_caller(make_stack, alice):
    h = make_stack()
    response = h.submit(alice, {"prompt": "  a lighthouse  ", "negative_prompt": "blurry"})
    assert response.status == 202
    body = response.json()
    assert set(body) == {"task_id", "status", "message"}
    assert body["status"] == "QUEUED"
    assert response.headers["location"] == f"/api/v1/tasks/{body['task_id']}"
    row = h.task_row(body["task_id"])
    assert row["user_id"] == alice.sub
    assert row["prompt"] == "a lighthouse"
    assert row["negative_prompt"] == "blurry"
    assert row["status"] == "QUEUED"
    assert int(row["expires_at"]) > 0
    assert _queued_messages(h) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "ok", "negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"prompt": "ok", "width": 4096}, "width"),
        ({"prompt": "ok", "width": 100}, "width"),
        ({"prompt": "ok", "height": "tall"}, "height"),
        ({"prompt": "ok", "steps": 0}, "steps"),
        ({"prompt": "ok", "seed": -1}, "seed"),
        ({"prompt": "ok", "sampler": "euler"}, "sampler"),
    ],
)
def test_invalid_field_is_400_naming_it_and_nothing_is_queued(make_stack, alice, body, field):
    h = make_stack()
    response = h.submit(alice, body)
    assert response.status == 400
    error = response.json()
    assert error["field"] == field
    assert error["code"] == "VALIDATION_ERROR"
    assert field in error["error"]
    assert _queued_messages(h) == 0
    assert _task_rows(h) == []


def test_body_that_is_not_json_is_400(make_stack, alice):
    h = make_stack()
    response = h.call(
        "submit_handler", "POST", "/api/v1/image/async", raw_body="prompt=fox", user=alice
    )
    assert response.status == 400
    assert response.json()["code"] == "INVALID_JSON"


def test_full_queue_refuses_with_503_and_retry_after(make_stack, alice):
    h = make_stack(parameters={"QueueCapacity": "2", **ONE_USER_MAY_FILL_THE_QUEUE})
    assert [h.submit(alice).status for _ in range(2)] == [202, 202]
    refused = h.submit(alice)
    assert refused.status == 503
    assert refused.headers["retry-after"].isdigit()
    assert refused.json()["code"] == "QUEUE_FULL"
    assert _queued_messages(h) == 2
    assert len(_task_rows(h)) == 2


def test_concurrent_submits_at_the_capacity_never_overshoot_it(make_stack):
    # A depth read then a send let 45 of 40 in under `make load`; the bound is now the
    # condition on the lane's own ticket write.
    capacity = 5
    h = make_stack(parameters={"QueueCapacity": str(capacity)})
    users = [User(sub=str(uuid.uuid4()), username=f"racer{i}") for i in range(12)]
    start = threading.Barrier(len(users))

    def submit(user: User) -> int:
        start.wait(timeout=10)
        return h.submit(user).status

    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        statuses = list(pool.map(submit, users))

    assert sorted(statuses) == [202] * capacity + [503] * (len(users) - capacity)
    assert _queued_messages(h) == capacity
    assert sorted(r["status"] for r in _task_rows(h)) == ["QUEUED"] * capacity


def test_a_full_lane_admits_again_once_a_task_leaves_its_line(make_stack, alice):
    h = make_stack(parameters={"QueueCapacity": "2", **ONE_USER_MAY_FILL_THE_QUEUE})
    first, _ = (h.submit(alice).json()["task_id"] for _ in range(2))
    assert h.submit(alice).status == 503

    assert h.cancel(alice, first).status == 200
    h.pump_task_events()  # the stream counts its departure from the waiting line

    assert h.submit(alice).status == 202
    assert h.submit(alice).status == 503


def test_queue_send_failure_is_503_and_leaves_no_queued_orphan(make_stack, alice):
    h = make_stack()

    def refuse_send(**_: object) -> None:
        raise ClientError(
            {"Error": {"Code": "ServiceUnavailable", "Message": "injected"}}, "SendMessage"
        )

    aws_clients.sqs().meta.events.register("before-call.sqs.SendMessage", refuse_send)
    response = h.submit(alice)
    assert response.status == 503
    assert response.json()["code"] == "SERVICE_UNAVAILABLE"
    assert "retry-after" in response.headers
    rows = _task_rows(h)
    assert len(rows) == 1
    assert rows[0]["status"] == "FAILED"
    assert "queue unavailable" in rows[0]["error"]
    assert _queued_messages(h) == 0


def test_submit_without_identity_is_refused(make_stack):
    h = make_stack()
    response = h.call("submit_handler", "POST", "/api/v1/image/async", body={"prompt": "x"})
    assert response.status == 401
