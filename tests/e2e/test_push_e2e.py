"""Push over WebSocket on the local stack: a client connected with its user's access token
hears of each of its tasks within a second of the task finishing, and of a running task's
progress within a second of its write; a bad token never connects.

Latency is measured as the message's arrival minus the task's `updated_at` (written with
its final state): the tasks stream, TaskEventsFunction and the management API in between.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jwt
import pytest
import requests
from moto.utilities.utils import load_resource
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gpuqueue.models import TaskProgress, TaskStatus
from gpuqueue.store.task_store import Claim, ProgressAck, TaskStore
from gpuqueue_testing import wait_for

from .conftest import ApiUser, LocalStackProcess

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

MEASURED_TASKS = 8
PUSH_LATENCY_LIMIT_S = 1.0
SLOW_GPU_S = 4.0  # long enough to write progress while the task runs


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


FINAL_EVENTS = frozenset({"task.done", "task.failed", "task.canceled", "task.expired"})


def message_about(
    client: ClientConnection,
    task_id: str,
    timeout: float,
    wanted: Callable[[dict[str, Any]], bool] = lambda m: m.get("type") in FINAL_EVENTS,
) -> tuple[dict, float]:
    """The first pushed message about `task_id` that is `wanted` (by default its end: a
    running task's progress pushes are passed over) and when it arrived (epoch seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no push about {task_id} within {timeout}s")
        message = json.loads(client.recv(timeout=remaining))
        if message.get("task", {}).get("task_id") == task_id and wanted(message):
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


def test_a_running_tasks_progress_is_pushed_to_its_owner_and_then_its_end(local_stack, new_user):
    # Given a slow GPU (both stand-ins: whichever takes the task), and the owner connected
    for server in (0, 1):
        local_stack.knobs(server, latency_s=SLOW_GPU_S)
    tasks = TaskStore(
        local_stack.aws_resource("dynamodb").Table(local_stack.state["resources"]["TasksTable"])
    )
    other = _register(local_stack)
    url = websocket_url(local_stack)
    try:
        with (
            connect(f"{url}?token={new_user.token}") as owners,
            connect(f"{url}?token={other.token}") as others,
        ):
            task_id = new_user.submit("a slow lighthouse", width=64, height=64)
            running = wait_for(
                lambda: (
                    (t := tasks.get(task_id)) is not None
                    and t.status is TaskStatus.RUNNING
                    and t.lease_id is not None
                    and t
                ),
                timeout=30,
                what="the task to run",
            )
            # When its GPU's progress is written as the dispatcher writes it (under its lease)
            claim = Claim(task=running, lease_id=str(running.lease_id))
            written = time.time()
            ack = tasks.report_progress(claim, TaskProgress.of(7, 20, eta_seconds=4.0))
            assert ack is ProgressAck.WRITTEN

            # Then the owner hears it (this write's, should the adapter report steps too)
            progress, received = message_about(
                owners,
                task_id,
                timeout=10,
                wanted=lambda m: (
                    m["type"] == "task.progress" and m["task"]["progress"]["step"] == 7
                ),
            )
            # and then its end
            done, _ = message_about(owners, task_id, timeout=30)
            # and the other user heard nothing of it
            with pytest.raises(TimeoutError):
                others.recv(timeout=0.5)
    finally:
        for server in (0, 1):
            local_stack.knobs(server, latency_s=0.2)

    assert progress["task"]["status"] == "RUNNING"
    assert progress["task"]["progress"] == {
        "step": 7,
        "steps": 20,
        "fraction": 0.35,
        "eta_seconds": 4.0,
    }
    assert received - written < PUSH_LATENCY_LIMIT_S
    assert done["type"] == "task.done"
    assert done["task"]["progress"] is None  # shown only while it runs


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
