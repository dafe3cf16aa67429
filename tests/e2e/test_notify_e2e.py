"""Knowing when a task is done, on the local stack over HTTP: signed webhooks through the
stream emulation, `Prefer: wait`, and queue position / ETA against a real queue."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from gpuqueue_local.standins.webhook_receiver import WebhookReceiver
from gpuqueue_testing import valid_signature, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

CALL_SECONDS = 1.0


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


def test_a_webhook_receiver_gets_one_valid_signed_delivery_after_failing_twice(
    local_stack, new_user, receiver
):
    receiver.script = [500, 502]
    task_id = new_user.submit("hooked", webhook_url=receiver.url)

    assert new_user.wait(task_id)["status"] == "DONE"
    # Retries come back after their backoff (the local stack's base is short).
    wait_for(lambda: any(s == 200 for _, _, s in receiver.received), timeout=30, what="delivery")

    statuses = [s for _, _, s in receiver.received]
    assert statuses == [500, 502, 200]
    arn = local_stack.state["resources"]["WebhookSigningSecret"]
    secret = local_stack.aws("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    assert all(valid_signature(secret, h, b) for h, b, _ in receiver.received)
    assert {h["x-gpuqueue-delivery"] for h, _, _ in receiver.received} == {
        json.loads(receiver.received[0][1])["delivery_id"]
    }
    log = new_user.get(f"/api/v1/tasks/{task_id}/deliveries").json()
    assert [a["ok"] for a in log["deliveries"]] == [False, False, True]


def test_prefer_wait_returns_the_finished_task_instead_of_202(local_stack, new_user):
    started = time.monotonic()
    answer = requests.post(
        f"{new_user.api}/api/v1/image/async",
        json={"prompt": "quick"},
        headers={**new_user.auth, "Prefer": "wait=10"},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "DONE"
    assert answer.headers["Preference-Applied"] == "wait=10"
    assert time.monotonic() - started < 10


def test_prefer_wait_on_status(local_stack, new_user):
    task_id = new_user.submit("status wait")

    answer = requests.get(
        f"{new_user.api}/api/v1/tasks/{task_id}",
        headers={**new_user.auth, "Prefer": "wait=10"},
        timeout=30,
    )

    assert answer.json()["status"] == "DONE"
