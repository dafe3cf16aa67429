"""Push over WebSocket on moto: the real $connect/$disconnect handlers behind the local
WebSocket API, the tasks stream through TaskEventsFunction, boto3's management API client.

Given users with Cognito access tokens (registered through AuthFunction), their WebSocket
clients connect through `WebSocketGateway` (the handlers run in this process, on moto), and a
finished task's stream record is pumped through TaskEventsFunction, which posts to the
gateway's management API.
"""

from __future__ import annotations

import base64
import importlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from fakes import FakeSpec
from gpuqueue.models import EndpointProtocol, TaskProgress
from gpuqueue.notify.push import ConnectionStore
from gpuqueue.store.task_store import Claim, ProgressAck, TaskStore
from gpuqueue_local.gateway import jwks_url
from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.template import load_template
from gpuqueue_local.websocket_gateway import WebSocketGateway, websocket_api
from gpuqueue_testing import FakeLambdaContext, load_event, wait_for
from template_functions import HANDLER_MODULE_BY_FUNCTION


@dataclass
class User:
    """What the harness needs of a user (the JWT authorizer's claims)."""

    sub: str
    username: str
    groups: tuple[str, ...] = ()


@dataclass
class InProcessFunction:
    """A handler module run in this process, with FunctionRuntime's surface."""

    module: str
    spec: FakeSpec = field(default_factory=FakeSpec)

    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        handler = importlib.import_module(self.module).lambda_handler
        try:
            payload = handler(event, FakeLambdaContext(function_name=self.module))
        except Exception as error:  # a function error, as Lambda reports it
            return InvocationResult(ok=False, error_type=type(error).__name__)
        return InvocationResult(ok=True, payload=payload)


@dataclass
class PushStack:
    harness: Any  # conftest's Harness
    gateway: WebSocketGateway
    tokens: dict[str, str] = field(default_factory=dict)
    _endpoints_checked: bool = False

    def user(self, username: str) -> User:
        """A registered user (a real Cognito access token)."""
        response = self.harness.call(
            "auth_handler",
            "POST",
            "/register",
            body={"username": username, "password": "pass1234word"},
        )
        assert response.status == 201, response.body
        token = response.json()["token"]
        payload = token.split(".")[1]
        sub = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]
        self.tokens[sub] = token
        return User(sub=sub, username=username)

    def connect(self, user: User, **kwargs: Any) -> ClientConnection:
        before = set(self.gateway.connection_ids())
        client = connect(f"{self.gateway.url}?token={self.tokens[user.sub]}", **kwargs)
        wait_for(lambda: set(self.gateway.connection_ids()) - before, what="the connection")
        return client

    def connections_of(self, user: User) -> set[str]:
        table = boto3.resource("dynamodb").Table(self.harness.stack.ref("ConnectionsTable"))
        rows = table.scan()["Items"]  # a handful of rows
        return {str(r["connection_id"]) for r in rows if r["user_id"] == user.sub}

    def finish(self, user: User) -> str:
        """The user submits a task; it runs to DONE; its stream record is delivered."""
        if not self._endpoints_checked:
            self.harness.run_checker()  # the stand-in GPU registered and healthy
            self._endpoints_checked = True
        task_id = str(self.harness.submit(user).json()["task_id"])
        self.harness.drain()
        self.harness.pump_task_events()
        return task_id


@pytest.fixture
def push(
    make_stack: Callable[..., Any], moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PushStack]:
    harness = make_stack()
    # The user pool's JWKS is served by moto (the template's URL points at AWS).
    monkeypatch.setenv("JWKS_URL", jwks_url(moto_url, harness.stack.ref("UserPool")))
    api = websocket_api(load_template())
    assert api is not None
    functions = {
        r.function: InProcessFunction(HANDLER_MODULE_BY_FUNCTION[r.function])
        for r in api.routes.values()
    }
    gateway = WebSocketGateway(api, functions=functions)  # type: ignore[arg-type]
    gateway.start("127.0.0.1")
    monkeypatch.setenv("WEBSOCKET_MANAGEMENT_URL", gateway.management_url)
    importlib.import_module("task_events_handler").task_events.cache_clear()
    yield PushStack(harness, gateway)
    gateway.stop()


def next_message(client: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(client.recv(timeout=timeout))
    return message


# --- connecting -----------------------------------------------------------------------------


def test_a_valid_access_token_connects_and_records_the_connection_under_its_user(
    push: PushStack,
) -> None:
    alice = push.user("alice")

    with push.connect(alice):
        (connection_id,) = push.gateway.connection_ids()
        assert push.connections_of(alice) == {connection_id}
        table = boto3.resource("dynamodb").Table(push.harness.stack.ref("ConnectionsTable"))
        row = table.get_item(Key={"connection_id": connection_id})["Item"]
        # API Gateway closes a connection after 2 hours: the row expires then.
        assert abs(int(row["expires_at"]) - (time.time() + 7200)) < 60


def test_the_token_may_come_in_an_authorization_header(push: PushStack) -> None:
    alice = push.user("alice")
    headers = {"Authorization": f"Bearer {push.tokens[alice.sub]}"}

    with connect(push.gateway.url, additional_headers=headers):
        wait_for(lambda: push.connections_of(alice), what="the row")


@pytest.mark.parametrize(
    "query", ["", "?token=", "?token=not-a-jwt", "?token=eyJhbGciOiJub25lIn0.e30."]
)
def test_a_missing_or_bad_token_is_refused_at_the_handshake_with_401(
    push: PushStack, query: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{push.gateway.url}{query}")

    assert refused.value.response.status_code == 401
    assert push.gateway.connection_ids() == []


def test_a_token_of_another_app_client_is_refused(push: PushStack) -> None:
    alice = push.user("alice")
    cognito = boto3.client("cognito-idp")
    other = cognito.create_user_pool_client(
        UserPoolId=push.harness.stack.ref("UserPool"),
        ClientName="someone-elses",
        ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
    )["UserPoolClient"]["ClientId"]
    token = cognito.initiate_auth(
        ClientId=other,
        AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": alice.username, "PASSWORD": "pass1234word"},
    )["AuthenticationResult"]["AccessToken"]

    with pytest.raises(InvalidStatus) as refused:
        connect(f"{push.gateway.url}?token={token}")

    assert refused.value.response.status_code == 401


def test_closing_the_connection_forgets_it(push: PushStack) -> None:
    alice = push.user("alice")

    with push.connect(alice):
        assert push.connections_of(alice)

    wait_for(lambda: not push.connections_of(alice), what="the row to go")


# --- pushing --------------------------------------------------------------------------------


def test_a_finished_task_reaches_every_connection_of_its_owner_as_the_api_shows_it(
    push: PushStack,
) -> None:
    alice = push.user("alice")

    with push.connect(alice) as phone, push.connect(alice) as laptop:
        task_id = push.finish(alice)

        messages = [next_message(phone), next_message(laptop)]

    shown = push.harness.get_task(alice, task_id).json()
    for message in messages:
        assert message == {"type": "task.done", "task": shown}


def test_only_the_owner_hears_of_a_task(push: PushStack) -> None:
    alice, bob = push.user("alice"), push.user("bob")

    with push.connect(alice) as alices, push.connect(bob) as bobs:
        alices_task = push.finish(alice)
        assert next_message(alices)["task"]["task_id"] == alices_task
        bobs_task = push.finish(bob)

        # Bob's first message is about his own task: Alice's never reached him.
        assert next_message(bobs)["task"]["task_id"] == bobs_task


def test_a_canceled_task_is_pushed_as_canceled(push: PushStack) -> None:
    alice = push.user("alice")

    with push.connect(alice) as client:
        task_id = push.harness.submit(alice).json()["task_id"]
        assert push.harness.cancel(alice, task_id).status == 200
        push.harness.pump_task_events()

        message = next_message(client)

    assert message["type"] == "task.canceled"
    assert message["task"]["status"] == "CANCELED"


def test_a_connection_that_is_gone_is_forgotten_when_a_push_finds_it(push: PushStack) -> None:
    alice = push.user("alice")
    table = boto3.resource("dynamodb").Table(push.harness.stack.ref("ConnectionsTable"))
    # A connection API Gateway dropped without $disconnect reaching us (it is best effort).
    stale = base64.urlsafe_b64encode(uuid.uuid4().bytes[:10]).decode()
    table.put_item(
        Item={
            "connection_id": stale,
            "user_id": alice.sub,
            "connected_at": "2026-01-27T10:00:00.000000Z",
            "expires_at": int(time.time()) + 3600,
        }
    )

    with push.connect(alice) as client:
        task_id = push.finish(alice)

        assert next_message(client)["task"]["task_id"] == task_id
        assert stale not in push.connections_of(alice)
        assert len(push.connections_of(alice)) == 1


def test_expired_rows_ttl_has_not_deleted_yet_are_not_pushed_to(push: PushStack) -> None:
    alice = push.user("alice")
    table = boto3.resource("dynamodb").Table(push.harness.stack.ref("ConnectionsTable"))
    table.put_item(
        Item={
            "connection_id": "expired-connection=",
            "user_id": alice.sub,
            "connected_at": "2026-01-27T08:00:00.000000Z",
            "expires_at": int(time.time()) - 1,
        }
    )
    assert ConnectionStore(table).by_user(alice.sub) == []


# --- a running task: progress and a cancel asked ----------------------------------------------


def tasks_of(push: PushStack) -> TaskStore:
    return TaskStore(boto3.resource("dynamodb").Table(push.harness.stack.ref("TasksTable")))


def running(push: PushStack, user: User) -> Claim:
    """The user's new task, claimed as a dispatcher claims it (on an A1111 endpoint)."""
    task_id = str(push.harness.submit(user).json()["task_id"])
    tasks = tasks_of(push)
    task = tasks.get(task_id)
    assert task is not None
    claim = tasks.claim(
        task,
        lease_seconds=60,
        now=time.time(),
        endpoint_id="gpu-1",
        endpoint_protocol=EndpointProtocol.A1111,
    )
    assert claim is not None
    return claim


def no_message(client: ClientConnection) -> bool:
    """Nothing is waiting on the socket (pushes are posted before the pump returns)."""
    try:
        client.recv(timeout=0.2)
    except TimeoutError:
        return True
    return False


def test_progress_reaches_the_owners_connections_and_no_one_elses(push: PushStack) -> None:
    alice, bob = push.user("alice"), push.user("bob")

    with push.connect(alice) as alices, push.connect(bob) as bobs:
        claim = running(push, alice)
        push.harness.pump_task_events()  # it left the waiting line: nothing pushed for that
        steps = []
        for step in (6, 12, 18):
            ack = tasks_of(push).report_progress(claim, TaskProgress.of(step, 30, eta_seconds=4))
            assert ack is ProgressAck.WRITTEN
            push.harness.pump_task_events()
            message = next_message(alices)
            assert message["type"] == "task.progress"
            steps.append(message["task"]["progress"]["step"])

        shown = push.harness.get_task(alice, claim.task.task_id).json()
        assert message == {"type": "task.progress", "task": shown}
        assert steps == [6, 12, 18]
        assert shown["progress"] == {"step": 18, "steps": 30, "fraction": 0.6, "eta_seconds": 4.0}
        assert no_message(bobs)


def test_a_cancel_asked_while_it_runs_is_pushed_then_its_end(push: PushStack) -> None:
    alice = push.user("alice")

    with push.connect(alice) as client:
        claim = running(push, alice)
        tasks_of(push).report_progress(claim, TaskProgress.of(3, 30))
        push.harness.pump_task_events()
        assert next_message(client)["type"] == "task.progress"

        assert push.harness.cancel(alice, claim.task.task_id).status == 202
        push.harness.pump_task_events()
        asked = next_message(client)
        assert tasks_of(push).cancel_running(claim)
        push.harness.pump_task_events()
        ended = next_message(client)

    assert (asked["type"], asked["task"]["status"], asked["task"]["cancel_requested"]) == (
        "task.cancel_requested",
        "RUNNING",
        True,
    )
    assert (ended["type"], ended["task"]["status"]) == ("task.canceled", "CANCELED")


def test_new_leases_and_next_attempts_reach_no_function_and_push_nothing(push: PushStack) -> None:
    alice = push.user("alice")
    tasks = tasks_of(push)

    with push.connect(alice) as client:
        claim = running(push, alice)
        push.harness.pump_task_events()
        tasks.report_progress(claim, TaskProgress.of(10, 30))
        assert push.harness.pump_task_events() == 1
        assert next_message(client)["type"] == "task.progress"

        # Another attempt elsewhere under a fresh lease; then that lease runs out and a
        # worker claims the run again: none of these writes reaches TaskEventsFunction.
        moved = tasks.next_attempt(claim, lease_seconds=0.001, now=time.time(), endpoint_id="gpu-2")
        assert moved is not None
        task = tasks.get(claim.task.task_id)
        assert task is not None
        assert task.progress is None
        reclaimed = tasks.claim(task, lease_seconds=60, now=time.time() + 1)
        assert reclaimed is not None

        assert push.harness.pump_task_events() == 0
        assert no_message(client)


def test_what_progress_costs_a_task_in_stream_records_and_pushes(push: PushStack) -> None:
    # A 12 s generation reporting at the dispatcher's bound (one write per 2 s): six
    # progress writes, each in a batch of its own, as at a quiet time.
    alice = push.user("alice")
    tasks = tasks_of(push)

    with push.connect(alice) as client:
        claim = running(push, alice)
        records = push.harness.pump_task_events()  # left the waiting line
        for step in range(5, 31, 5):
            tasks.report_progress(claim, TaskProgress.of(step, 30))
            records += push.harness.pump_task_events()
        assert tasks.complete(claim, result_key="results/x.png", endpoint_id="gpu-1")
        records += push.harness.pump_task_events()
        types = [next_message(client)["type"] for _ in range(7)]

    # Two records before progress (it left the line, it ended); six more with it; each
    # progress record one push (a message, a connections query).
    assert records == 8
    assert types == ["task.progress"] * 6 + ["task.done"]


# --- the sample events (what `sam local invoke` sends) -----------------------------------------


def test_the_connect_sample_is_refused_its_token_being_a_placeholder(push: PushStack) -> None:
    result = InProcessFunction("connect_handler").invoke(load_event("connect_token"))

    assert result.ok
    assert result.payload["statusCode"] == 401


def test_the_disconnect_sample_forgets_its_connection(push: PushStack) -> None:
    event = load_event("disconnect_client")
    connection_id = event["requestContext"]["connectionId"]
    table = boto3.resource("dynamodb").Table(push.harness.stack.ref("ConnectionsTable"))
    ConnectionStore(table).put(connection_id, "3f6b2c1e-8d4a-4f5e-9b7c-1a2d3e4f5a6b")

    result = InProcessFunction("disconnect_handler").invoke(event)

    assert result.ok
    assert "Item" not in table.get_item(Key={"connection_id": connection_id})
