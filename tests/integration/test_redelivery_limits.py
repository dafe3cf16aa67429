"""Redelivery is bounded: per task (3 at once, then one a minute), per user
(RedeliveriesPerUserPerHour), and a call while a delivery is still retrying names that one
instead of queueing another. Over the handlers, on moto, with each function's own role."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest

from gpuqueue_local.standins.webhook_receiver import WebhookReceiver


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def _redeliver(h, user, task_id):
    return h.call(
        "tasks_handler",
        "POST",
        f"/api/v1/tasks/{task_id}/deliveries/redeliver",
        route="/api/v1/tasks/{task_id}/deliveries/redeliver",
        path_params={"task_id": task_id},
        user=user,
    )


def _messages_on_webhook_queue(h) -> int:
    attributes = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.stack.ref("WebhookQueue"),
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def test_fifteen_redeliveries_of_one_task_queue_three_and_the_rest_are_told_when_to_retry(
    make_stack, alice, receiver
):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "again", "webhook_url": receiver.url}).json()["task_id"]
    h.finish_and_notify()
    assert len(receiver.received) == 1

    answers = [_redeliver(h, alice, task_id) for _ in range(15)]

    assert [a.status for a in answers] == [202] * 3 + [429] * 12
    assert _messages_on_webhook_queue(h) == 3
    for refused in answers[3:]:
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["code"] == "RATE_LIMITED"
        assert refused.json()["field"] == "task_id"
        assert "redelivery" in refused.json()["error"]
    h.deliver_webhooks()
    assert len(receiver.received) == 1 + 3


def test_a_user_past_their_hourly_redeliveries_is_refused_on_every_task(
    make_stack, alice, bob, receiver
):
    h = make_stack(parameters={"RedeliveriesPerUserPerHour": "2"})
    h.run_checker()
    first, second = (
        h.submit(alice, {"prompt": p, "webhook_url": receiver.url}).json()["task_id"]
        for p in ("one", "two")
    )
    bobs = h.submit(bob, {"prompt": "his", "webhook_url": receiver.url}).json()["task_id"]
    h.finish_and_notify()

    assert _redeliver(h, alice, first).status == 202
    assert _redeliver(h, alice, second).status == 202
    refused = _redeliver(h, alice, first)
    other_task = _redeliver(h, alice, second)

    assert refused.status == other_task.status == 429
    # Two an hour: a token comes back every 30 minutes.
    assert 1700 <= int(other_task.headers["retry-after"]) <= 1800
    assert _redeliver(h, bob, bobs).status == 202  # another user's allowance is their own


def test_a_redelivery_while_a_delivery_is_retrying_names_it_instead_of_queueing_another(
    make_stack, alice, receiver
):
    receiver.script = [500] * 5
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "down", "webhook_url": receiver.url}).json()["task_id"]
    h.drain()
    h.pump_task_events()
    sqs = boto3.client("sqs")
    queue = h.stack.ref("WebhookQueue")
    first = sqs.receive_message(QueueUrl=queue, AttributeNames=["All"])["Messages"]
    h.call_sqs_function("webhook_handler", "WebhookQueue", first)  # one attempt: HTTP 500
    [(headers, _, status)] = receiver.received
    assert status == 500

    answer = _redeliver(h, alice, task_id)

    assert answer.status == 202
    assert answer.json()["coalesced"] is True
    assert answer.json()["delivery_id"] == headers["x-gpuqueue-delivery"]
    assert _messages_on_webhook_queue(h) == 1  # only the delivery being retried
