"""PushNotifier: a finished task goes to every open connection of its owner, best effort."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from gpuqueue.models import Task, TaskProgress, TaskStatus, TaskView
from gpuqueue.notify.push import PushNotifier, push_message

ALICE = "alice-sub"


def task(status: TaskStatus = TaskStatus.DONE, owner: str = ALICE) -> Task:
    return Task(
        task_id="550e8400-e29b-41d4-a716-446655440000",
        user_id=owner,
        status=status,
        prompt="a lighthouse at dawn",
        created_at="2026-01-27T10:00:00.000000Z",
        updated_at="2026-01-27T10:00:12.981000Z",
        started_at="2026-01-27T10:00:00.412000Z",
        attempt=1,
        result_key="results/550e8400-e29b-41d4-a716-446655440000.png",
    )


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PostToConnection",
    )


@dataclass
class FakeConnections:
    by_owner: dict[str, list[str]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    failure: Exception | None = None

    def by_user(self, user_id: str) -> list[str]:
        if self.failure is not None:
            raise self.failure
        return list(self.by_owner.get(user_id, []))

    def delete(self, connection_id: str) -> None:
        self.deleted.append(connection_id)


@dataclass
class FakeManagementApi:
    """Records posts; a connection id mapped to an exception raises it."""

    failures: dict[str, Exception] = field(default_factory=dict)
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def post_to_connection(self, *, Data: bytes, ConnectionId: str) -> Any:
        if ConnectionId in self.failures:
            raise self.failures[ConnectionId]
        self.posts.append((ConnectionId, json.loads(Data)))
        return {}


@pytest.mark.parametrize("status", ["DONE", "FAILED", "CANCELED", "EXPIRED"])
def test_the_message_names_the_final_state_and_carries_the_task_as_the_api_shows_it(
    status: str,
) -> None:
    finished = task(TaskStatus(status))

    message = push_message(finished)

    assert message["type"] == f"task.{status.lower()}"
    assert message["task"] == TaskView.of(finished).model_dump(mode="json")
    json.dumps(message)  # a JSON text frame


def test_a_running_tasks_progress_is_its_own_event_with_the_task_as_the_api_shows_it() -> None:
    running = task(TaskStatus.RUNNING).model_copy(
        update={"progress": TaskProgress.of(12, 30, eta_seconds=7.25), "result_key": None}
    )

    message = push_message(running)

    assert message["type"] == "task.progress"
    assert message["task"] == TaskView.of(running).model_dump(mode="json")
    assert message["task"]["status"] == "RUNNING"
    assert message["task"]["progress"] == {
        "step": 12,
        "steps": 30,
        "fraction": 0.4,
        "eta_seconds": 7.2,
    }
    assert message["task"]["cancel_requested"] is False


def test_a_cancel_asked_while_it_runs_is_told_apart_from_progress_and_from_the_end() -> None:
    stopping = task(TaskStatus.RUNNING).model_copy(
        update={
            "progress": TaskProgress.of(12, 30),
            "cancel_requested_at": "2026-01-27T10:00:09.000000Z",
            "result_key": None,
        }
    )
    canceled = stopping.model_copy(update={"status": TaskStatus.CANCELED, "progress": None})

    assert push_message(stopping)["type"] == "task.cancel_requested"
    assert push_message(stopping)["task"]["cancel_requested"] is True
    assert push_message(canceled)["type"] == "task.canceled"


def test_running_changes_go_to_the_owners_connections_as_ends_do() -> None:
    connections = FakeConnections({ALICE: ["c-1", "c-2"], "bob-sub": ["c-bob"]})
    api = FakeManagementApi()
    running = task(TaskStatus.RUNNING).model_copy(update={"progress": TaskProgress.of(3, 30)})

    PushNotifier(connections, api).tasks_changed([running])

    assert [(c, m["type"]) for c, m in api.posts] == [
        ("c-1", "task.progress"),
        ("c-2", "task.progress"),
    ]


def test_every_open_connection_of_the_owner_gets_the_task() -> None:
    connections = FakeConnections({ALICE: ["c-1", "c-2"], "bob-sub": ["c-bob"]})
    api = FakeManagementApi()

    PushNotifier(connections, api).task_ended(task())

    assert [c for c, _ in api.posts] == ["c-1", "c-2"]
    assert all(m["type"] == "task.done" for _, m in api.posts)
    assert api.posts[0][1]["task"]["result_url"] == (
        "/api/images/550e8400-e29b-41d4-a716-446655440000"
    )


def test_a_user_without_connections_costs_no_post() -> None:
    api = FakeManagementApi()

    PushNotifier(FakeConnections(), api).task_ended(task())

    assert api.posts == []


def test_a_gone_connection_is_forgotten_and_the_others_still_get_the_task() -> None:
    connections = FakeConnections({ALICE: ["gone", "open"]})
    api = FakeManagementApi(failures={"gone": client_error("GoneException", 410)})

    PushNotifier(connections, api).task_ended(task())

    assert connections.deleted == ["gone"]
    assert [c for c, _ in api.posts] == ["open"]


@pytest.mark.parametrize(
    "failure",
    [
        client_error("LimitExceededException", 429),
        client_error("ForbiddenException", 403),
        client_error("InternalServerError", 500),
        EndpointConnectionError(endpoint_url="https://abc.execute-api.us-east-1.amazonaws.com"),
    ],
    ids=["throttled", "forbidden", "server-error", "unreachable"],
)
def test_any_other_failure_is_logged_and_never_fails_the_stream_record(failure: Exception) -> None:
    connections = FakeConnections({ALICE: ["bad", "good"]})
    api = FakeManagementApi(failures={"bad": failure})

    PushNotifier(connections, api).task_ended(task())  # no exception

    assert connections.deleted == []  # only a 410 forgets a connection
    assert [c for c, _ in api.posts] == ["good"]


def test_an_unreadable_connections_table_skips_the_push_without_failing() -> None:
    connections = FakeConnections(failure=client_error("ProvisionedThroughputExceeded", 400))
    api = FakeManagementApi()

    PushNotifier(connections, api).task_ended(task())

    assert api.posts == []
