"""Webhooks end to end in-process: submit with webhook_url -> dispatcher -> tasks stream ->
TaskEventsFunction -> webhook queue -> WebhookFunction -> a receiver on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest

from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_local.standins.webhook_receiver import WebhookReceiver
from gpuqueue_testing import valid_signature


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def _secret(h) -> str:
    arn = h.stack.ref("WebhookSigningSecret")
    return str(boto3.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"])


def test_a_finished_task_gets_exactly_one_valid_signed_delivery(make_stack, alice, receiver):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "hooked", "webhook_url": receiver.url}).json()["task_id"]

    h.finish_and_notify()

    assert len(receiver.received) == 1
    headers, body, _ = receiver.received[0]
    assert valid_signature(_secret(h), headers, body)
    assert headers["x-gpuqueue-event"] == "task.done"
    sent = json.loads(body)
    assert sent["event"] == "task.done"
    assert sent["delivery_id"] == headers["x-gpuqueue-delivery"]
    assert sent["task"]["task_id"] == task_id
    assert sent["task"]["status"] == "DONE"
    assert sent["task"]["result_url"] == f"/api/images/{task_id}"
    # A tampered body no longer matches its signature.
    assert not valid_signature(_secret(h), headers, body.replace(b"DONE", b"FAIL"))


def test_a_receiver_that_fails_twice_gets_one_good_delivery_on_the_third_try(
    make_stack, alice, receiver
):
    receiver.script = [500, 503]
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "retry me", "webhook_url": receiver.url}).json()["task_id"]

    h.finish_and_notify()

    assert [status for _, _, status in receiver.received] == [500, 503, 200]
    delivery_ids = {headers["x-gpuqueue-delivery"] for headers, _, _ in receiver.received}
    assert len(delivery_ids) == 1  # the same delivery, tried three times
    assert all(valid_signature(_secret(h), headers, body) for headers, body, _ in receiver.received)
    log = h.call(
        "tasks_handler",
        "GET",
        f"/api/v1/tasks/{task_id}/deliveries",
        route="/api/v1/tasks/{task_id}/deliveries",
        path_params={"task_id": task_id},
        user=alice,
    ).json()
    assert log["webhook_url"] == receiver.url
    attempts = log["deliveries"]
    assert [(a["attempt"], a["ok"], a.get("status_code")) for a in attempts] == [
        (1, False, 500),
        (2, False, 503),
        (3, True, 200),
    ]
    assert all(a["event"] == "task.done" and "at" in a for a in attempts)


def test_a_repeated_stream_record_does_not_deliver_twice(make_stack, alice, receiver):
    h = make_stack()
    h.run_checker()
    h.submit(alice, {"prompt": "once", "webhook_url": receiver.url})
    h.finish_and_notify()
    assert len(receiver.received) == 1

    # The stream delivers the final write again (at-least-once): the same delivery id.
    h.task_stream = None  # read the stream again from its start
    h.pump_task_events()
    h.deliver_webhooks()

    assert len(receiver.received) == 1


def test_a_failed_task_is_announced_and_events_can_be_narrowed(make_stack, alice, receiver):
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0)],
        parameters={"MaxAttempts": "1", "CircuitFailureThreshold": "10"},
    )
    h.run_checker()
    only_done = {"prompt": "a", "webhook_url": receiver.url, "webhook_events": ["task.done"]}
    failing = {"prompt": "b", "webhook_url": receiver.url, "webhook_events": ["task.failed"]}
    h.submit(alice, only_done)
    wanted = h.submit(alice, failing).json()["task_id"]

    h.finish_and_notify()

    assert [json.loads(body)["task"]["task_id"] for _, body, _ in receiver.received] == [wanted]
    assert receiver.received[0][0]["x-gpuqueue-event"] == "task.failed"


def test_a_cancel_is_announced(make_stack, alice, receiver):
    h = make_stack()
    task_id = h.submit(alice, {"prompt": "never mind", "webhook_url": receiver.url}).json()[
        "task_id"
    ]
    assert h.cancel(alice, task_id).status == 200

    h.pump_task_events()
    h.deliver_webhooks()

    assert [headers["x-gpuqueue-event"] for headers, _, _ in receiver.received] == ["task.canceled"]


def test_a_receiver_that_never_answers_well_is_dead_lettered_after_the_last_attempt(
    make_stack, alice, receiver
):
    receiver.script = [500] * 10
    h = make_stack(env={"WEBHOOK_MAX_ATTEMPTS": "3"})
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "doomed", "webhook_url": receiver.url}).json()["task_id"]

    h.finish_and_notify()

    assert len(receiver.received) == 3
    dead = boto3.client("sqs").receive_message(
        QueueUrl=h.stack.ref("WebhookDeadLetterQueue"), MaxNumberOfMessages=10
    )["Messages"]
    assert [json.loads(m["Body"])["task_id"] for m in dead] == [task_id]
    attempts = h.task_row(task_id)["deliveries"]
    assert [bool(a.get("gave_up")) for a in attempts] == [False, False, True]


def test_the_owner_can_ask_for_a_redelivery(make_stack, alice, bob, receiver):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "again", "webhook_url": receiver.url}).json()["task_id"]
    h.finish_and_notify()

    def redeliver(user):
        return h.call(
            "tasks_handler",
            "POST",
            f"/api/v1/tasks/{task_id}/deliveries/redeliver",
            route="/api/v1/tasks/{task_id}/deliveries/redeliver",
            path_params={"task_id": task_id},
            user=user,
        )

    assert redeliver(bob).status == 404  # not bob's task
    answer = redeliver(alice)
    h.deliver_webhooks()

    assert answer.status == 202
    assert len(receiver.received) == 2
    first, second = (headers["x-gpuqueue-delivery"] for headers, _, _ in receiver.received)
    assert second == answer.json()["delivery_id"] != first


def test_a_redelivery_before_the_task_ends_is_a_conflict(make_stack, alice, receiver):
    h = make_stack()
    task_id = h.submit(alice, {"prompt": "wait", "webhook_url": receiver.url}).json()["task_id"]

    answer = h.call(
        "tasks_handler",
        "POST",
        f"/api/v1/tasks/{task_id}/deliveries/redeliver",
        route="/api/v1/tasks/{task_id}/deliveries/redeliver",
        path_params={"task_id": task_id},
        user=alice,
    )

    assert answer.status == 409


def test_during_a_rotation_both_secrets_sign(make_stack, alice, receiver):
    h = make_stack()
    h.run_checker()
    old = _secret(h)
    boto3.client("secretsmanager").put_secret_value(
        SecretId=h.stack.ref("WebhookSigningSecret"), SecretString="the-new-signing-secret"
    )
    h.submit(alice, {"prompt": "rotating", "webhook_url": receiver.url})

    h.finish_and_notify()

    headers, body, _ = receiver.received[0]
    assert headers["x-gpuqueue-signature"].count("v1=") == 2
    assert valid_signature("the-new-signing-secret", headers, body)
    assert valid_signature(old, headers, body)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/hook", "https"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://localhost:8443/hook", "loopback"),
        ("https://10.1.2.3/hook", "private"),
        ("https://192.168.0.10/hook", "private"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[::1]/hook", "loopback"),
        ("https://[::ffff:10.0.0.1]/hook", "private"),
        ("https://[::127.0.0.1]/hook", "loopback"),
        ("https://[64:ff9b::a9fe:a9fe]/hook", "link-local"),
        ("https://[2002:a00:1::1]/hook", "private"),
        ("https://100.64.0.1/hook", "reserved"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_ssrf_targets_are_refused_at_submit_with_400(make_stack, alice, url, reason):
    h = make_stack(env={"WEBHOOK_ALLOW_LOOPBACK": "false"})

    refused = h.submit(alice, {"prompt": "p", "webhook_url": url})

    assert refused.status == 400
    assert refused.json()["field"] == "webhook_url"
    assert reason.split()[0] in refused.json()["error"] or reason == "credentials"
    assert h.call("tasks_handler", "GET", "/api/v1/tasks", user=alice).json() == []
