"""Knowing when a task is done, on the local stack over HTTP: signed webhooks through the
stream emulation, `Prefer: wait`, and queue position / ETA against a real queue."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
import requests

from gpuqueue_testing import wait_for

from .conftest import LocalStackProcess

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

CALL_SECONDS = 1.0


class Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.url = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver([])
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                status = state.statuses.pop(0) if state.statuses else 200
                headers = {k.lower(): v for k, v in self.headers.items()}
                state.received.append((headers, body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    yield state
    server.shutdown()
    server.server_close()


def _signing_secret(stack: LocalStackProcess) -> str:
    client = boto3.client(
        "secretsmanager",
        endpoint_url=stack.state["moto_url"],
        region_name=stack.state["region"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    arn = stack.state["resources"]["WebhookSigningSecret"]
    return str(client.get_secret_value(SecretId=arn)["SecretString"])


def _valid(secret: str, headers: dict[str, str], body: bytes) -> bool:
    fields = [part.split("=", 1) for part in headers["x-gpuqueue-signature"].split(",")]
    timestamp = next(v for k, v in fields if k == "t")
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return any(hmac.compare_digest(v, digest.hexdigest()) for k, v in fields if k == "v1")


def test_a_webhook_receiver_gets_one_valid_signed_delivery_after_failing_twice(
    local_stack, new_user, receiver
):
    receiver.statuses = [500, 502]
    task_id = new_user.submit("hooked", webhook_url=receiver.url)

    assert new_user.wait(task_id)["status"] == "DONE"
    # Retries come back after their backoff (the local stack's base is short).
    wait_for(lambda: any(s == 200 for _, _, s in receiver.received), timeout=30, what="delivery")

    statuses = [s for _, _, s in receiver.received]
    assert statuses == [500, 502, 200]
    secret = _signing_secret(local_stack)
    assert all(_valid(secret, h, b) for h, b, _ in receiver.received)
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
