"""Push over WebSocket on the local stack: a client connected with its user's access token
hears of each of its tasks within a second of the task finishing; a bad token never connects.

Latency is measured as the message's arrival minus the task's `updated_at` (written with
its final state): the tasks stream, TaskEventsFunction and the management API in between.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Any

import jwt
import pytest
import requests
from moto.utilities.utils import load_resource
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .conftest import ApiUser, LocalStackProcess

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

MEASURED_TASKS = 8
PUSH_LATENCY_LIMIT_S = 1.0


def _register(stack: LocalStackProcess) -> ApiUser:
    username = f"u{uuid.uuid4().hex[:10]}"
    password = "pass1234word"
    response = requests.post(
        f"{stack.api}/register", json={"username": username, "password": password}, timeout=30
    )
    assert response.status_code == 201, response.text
    return ApiUser(stack.api, username, password, response.json()["token"])


def websocket_url(local_stack: Any) -> str:
    url = local_stack.state.get("websocket_url")
    assert url, "the local stack serves no WebSocket API"
    return str(url)


def message_about(client: ClientConnection, task_id: str, timeout: float) -> tuple[dict, float]:
    """The first pushed message about `task_id` and when it arrived (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no push about {task_id} within {timeout}s")
        message = json.loads(client.recv(timeout=remaining))
        if message.get("task", {}).get("task_id") == task_id:
            return message, time.time()


def finished_at(task: dict[str, Any]) -> float:
    return datetime.fromisoformat(task["updated_at"].replace("Z", "+00:00")).timestamp()


def test_a_client_hears_that_its_task_is_done_within_a_second(local_stack, new_user):
    with connect(f"{websocket_url(local_stack)}?token={new_user.token}") as client:
        # The first task also wakes what a fresh stack has cold (the stream's first shard,
        # the task-events worker's clients); it is not measured.
        message_about(client, new_user.submit("warm-up", width=64, height=64), timeout=30)
        latencies = []
        for number in range(MEASURED_TASKS):
            task_id = new_user.submit(f"a red fox, take {number}", width=64, height=64)

            message, received = message_about(client, task_id, timeout=30)

            assert message["type"] == "task.done"
            assert message["task"]["status"] == "DONE"
            assert message["task"]["result_url"] == f"/api/images/{task_id}"
            latencies.append(received - finished_at(message["task"]))

    assert max(latencies) < PUSH_LATENCY_LIMIT_S, sorted(latencies)


def test_the_pushed_task_is_what_the_status_api_shows(local_stack, new_user):
    with connect(f"{websocket_url(local_stack)}?token={new_user.token}") as client:
        task_id = new_user.submit("a lighthouse", width=64, height=64)
        message, _ = message_about(client, task_id, timeout=30)

    assert message["task"] == new_user.get(f"/api/v1/tasks/{task_id}").json()


def test_only_the_owner_hears_of_a_task(local_stack, new_user):
    other = _register(local_stack)
    url = websocket_url(local_stack)
    with (
        connect(f"{url}?token={new_user.token}") as owners,
        connect(f"{url}?token={other.token}") as others,
    ):
        message_about(owners, new_user.submit("mine", width=64, height=64), timeout=30)
        theirs = other.submit("theirs", width=64, height=64)

        # The other user's first message is about their own task: the owner's never came.
        first = json.loads(others.recv(timeout=30))
        assert first["task"]["task_id"] == theirs


@pytest.mark.parametrize("query", ["", "?token=", "?token=not-a-jwt"])
def test_a_missing_or_bad_token_is_refused_at_the_handshake(local_stack, query):
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{websocket_url(local_stack)}{query}")

    assert refused.value.response.status_code == 401


def test_an_expired_token_is_refused_at_the_handshake(local_stack, new_user):
    # Signed with the local Cognito's own key (moto's published one), as a forger could.
    private = load_resource("cognitoidp/resources/jwks-private.json")
    claims = jwt.decode(new_user.token, options={"verify_signature": False})
    expired = jwt.encode(
        {**claims, "exp": int(time.time()) - 5, "iat": int(time.time()) - 3600},
        jwt.PyJWK(private).key,
        algorithm="RS256",
        headers={"kid": private.get("kid", "dummy")},
    )

    with pytest.raises(InvalidStatus) as refused:
        connect(f"{websocket_url(local_stack)}?token={expired}")

    assert refused.value.response.status_code == 401
