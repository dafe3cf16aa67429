"""The local WebSocket API over real sockets: handshake, routes, close, and the management API
as boto3's `apigatewaymanagementapi` client sees it. The functions are recording fakes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from fakes import RecordingFunction
from gpuqueue_local.emulator_iam import EmulatorIam
from gpuqueue_local.function_identities import FunctionIdentity
from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.websocket_gateway import (
    MAX_MESSAGE_BYTES,
    WebSocketApiSpec,
    WebSocketGateway,
    WebSocketRoute,
)
from gpuqueue_testing import wait_for

API = WebSocketApiSpec(
    logical_id="WebSocketApi",
    stage="v1",
    route_selection_expression="$request.body.action",
    routes={
        "$connect": WebSocketRoute("$connect", "Connect"),
        "$disconnect": WebSocketRoute("$disconnect", "Disconnect"),
        "$default": WebSocketRoute("$default", "Default"),
        "echo": WebSocketRoute("echo", "Echo", two_way=True),
    },
)


@dataclass
class Running:
    gateway: WebSocketGateway
    functions: dict[str, RecordingFunction]

    @property
    def url(self) -> str:
        return self.gateway.url

    def management(self, url: str | None = None) -> Any:
        return boto3.client(
            "apigatewaymanagementapi",
            endpoint_url=url or self.gateway.management_url,
            region_name="us-east-1",
        )

    def connection_id(self) -> str:
        (connection_id,) = wait_for(self.gateway.connection_ids, what="the connection")
        return str(connection_id)


@pytest.fixture
def ws() -> Iterator[Running]:
    functions = {
        "Connect": RecordingFunction(),
        "Disconnect": RecordingFunction(),
        "Default": RecordingFunction(),
        "Echo": RecordingFunction(
            result=InvocationResult(ok=True, payload={"statusCode": 200, "body": '{"echoed":true}'})
        ),
    }
    gateway = WebSocketGateway(API, functions=functions)
    gateway.start("127.0.0.1")
    yield Running(gateway, functions)
    gateway.stop()


# --- the handshake --------------------------------------------------------------------------


def test_the_connect_function_sees_the_query_string_and_headers(ws: Running) -> None:
    with connect(f"{ws.url}?token=abc", additional_headers={"Authorization": "Bearer xyz"}):
        connection_id = ws.connection_id()

    (event,) = ws.functions["Connect"].events
    assert event["queryStringParameters"] == {"token": "abc"}
    assert event["headers"]["Authorization"] == "Bearer xyz"
    assert event["requestContext"]["connectionId"] == connection_id
    assert event["requestContext"]["stage"] == "v1"


@pytest.mark.parametrize("status", [401, 403, 429])
def test_a_connect_function_refusal_refuses_the_handshake_with_its_status(
    ws: Running, status: int
) -> None:
    ws.functions["Connect"].result = InvocationResult(
        ok=True, payload={"statusCode": status, "body": '{"message":"no"}'}
    )

    with pytest.raises(InvalidStatus) as refused:
        connect(f"{ws.url}?token=bad")

    assert refused.value.response.status_code == status
    assert ws.gateway.connection_ids() == []
    assert ws.functions["Disconnect"].events == []  # never connected, never disconnected


def test_a_failing_connect_function_is_a_502(ws: Running) -> None:
    ws.functions["Connect"].result = InvocationResult(ok=False, error_type="Runtime.ExitError")

    with pytest.raises(InvalidStatus) as refused:
        connect(ws.url)

    assert refused.value.response.status_code == 502


def test_another_stage_is_forbidden(ws: Running) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(ws.url.replace("/v1", "/prod"))

    assert refused.value.response.status_code == 403
    assert ws.functions["Connect"].events == []


# --- messages and close ---------------------------------------------------------------------


def test_a_message_goes_to_its_actions_route_and_a_two_way_route_answers(ws: Running) -> None:
    with connect(ws.url) as client:
        client.send(json.dumps({"action": "echo"}))
        answer = client.recv(timeout=5)

    assert json.loads(answer) == {"echoed": True}
    (event,) = ws.functions["Echo"].events
    assert event["requestContext"]["routeKey"] == "echo"
    assert event["body"] == '{"action": "echo"}'


def test_a_message_without_a_route_of_its_own_goes_to_default(ws: Running) -> None:
    with connect(ws.url) as client:
        client.send("hello")
        wait_for(lambda: ws.functions["Default"].events, what="$default")

    assert ws.functions["Default"].events[0]["body"] == "hello"


def test_closing_runs_disconnect_with_the_close_code(ws: Running) -> None:
    with connect(ws.url) as client:
        connection_id = ws.connection_id()
        client.close(1000, "bye")

    (event,) = wait_for(lambda: ws.functions["Disconnect"].events, what="$disconnect")
    assert event["requestContext"]["connectionId"] == connection_id
    assert event["requestContext"]["disconnectStatusCode"] == 1000
    assert ws.gateway.connection_ids() == []


def test_an_idle_connection_is_closed_going_away(ws: Running) -> None:
    ws.gateway.idle_timeout_s = 0.3

    with connect(ws.url) as client, pytest.raises(ConnectionClosed):
        client.recv(timeout=5)

    assert client.close_code == 1001


# --- the management API ---------------------------------------------------------------------


def test_post_to_connection_sends_a_text_frame(ws: Running) -> None:
    with connect(ws.url) as client:
        connection_id = ws.connection_id()
        ws.management().post_to_connection(ConnectionId=connection_id, Data=b'{"type":"x"}')

        assert client.recv(timeout=5) == '{"type":"x"}'


def test_get_connection_describes_it(ws: Running) -> None:
    with connect(ws.url, user_agent_header="probe/1.0"):
        described = ws.management().get_connection(ConnectionId=ws.connection_id())

    assert described["Identity"] == {"SourceIp": "127.0.0.1", "UserAgent": "probe/1.0"}
    assert described["LastActiveAt"] >= described["ConnectedAt"]


def test_delete_connection_closes_it(ws: Running) -> None:
    with connect(ws.url) as client:
        ws.management().delete_connection(ConnectionId=ws.connection_id())

        with pytest.raises(ConnectionClosed):
            client.recv(timeout=5)

    wait_for(lambda: ws.functions["Disconnect"].events, what="$disconnect")


@pytest.mark.parametrize("operation", ["post_to_connection", "get_connection", "delete_connection"])
def test_an_unknown_connection_is_gone(ws: Running, operation: str) -> None:
    client = ws.management()
    kwargs: dict[str, Any] = {"ConnectionId": "Yx2FhdqJoAMCJEQ="}
    if operation == "post_to_connection":
        kwargs["Data"] = b"{}"

    with pytest.raises(client.exceptions.GoneException):
        getattr(client, operation)(**kwargs)


def test_a_closed_connection_is_gone(ws: Running) -> None:
    with connect(ws.url):
        connection_id = ws.connection_id()
    wait_for(lambda: not ws.gateway.connection_ids(), what="the close")

    client = ws.management()
    with pytest.raises(client.exceptions.GoneException):
        client.post_to_connection(ConnectionId=connection_id, Data=b"{}")


def test_a_message_over_128_kb_is_refused(ws: Running) -> None:
    with connect(ws.url):
        client = ws.management()
        with pytest.raises(client.exceptions.PayloadTooLargeException):
            client.post_to_connection(
                ConnectionId=ws.connection_id(), Data=b"x" * (MAX_MESSAGE_BYTES + 1)
            )


def test_another_stages_management_api_is_forbidden(ws: Running) -> None:
    with connect(ws.url):
        client = ws.management(ws.gateway.management_url.replace("/v1", "/prod"))
        with pytest.raises(ClientError) as refused:
            client.post_to_connection(ConnectionId=ws.connection_id(), Data=b"{}")

    assert refused.value.response["Error"]["Code"] == "ForbiddenException"


# --- IAM on the management API: SigV4 and execute-api:ManageConnections -----------------------


def _identity(name: str, statements: list[dict[str, Any]]) -> FunctionIdentity:
    return FunctionIdentity(
        logical_id=name,
        user_name=f"it-{name}",
        access_key_id=f"AKIA{name.upper():0<16}"[:20],
        secret_access_key=f"secret-of-{name}",
        policies=({"Version": "2012-10-17", "Statement": statements},),
    )


POSTER = _identity(
    "poster",
    [
        {
            "Effect": "Allow",
            "Action": "execute-api:ManageConnections",
            "Resource": (
                "arn:aws:execute-api:us-east-1:123456789012:abcdefghij/v1/POST/@connections/*"
            ),
        }
    ],
)
OUTSIDER = _identity(
    "outsider", [{"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": "*"}]
)


@pytest.fixture
def ws_iam() -> Iterator[Running]:
    functions = {"Connect": RecordingFunction(), "Disconnect": RecordingFunction()}
    gateway = WebSocketGateway(
        API,
        functions=functions,
        api_id="abcdefghij",
        iam=EmulatorIam({"Poster": POSTER, "Outsider": OUTSIDER}),
    )
    gateway.start("127.0.0.1")
    yield Running(gateway, functions)  # type: ignore[arg-type]
    gateway.stop()


def _management_as(ws: Running, identity: FunctionIdentity, secret: str | None = None) -> Any:
    return boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=ws.gateway.management_url,
        region_name="us-east-1",
        aws_access_key_id=identity.access_key_id,
        aws_secret_access_key=secret or identity.secret_access_key,
    )


def test_a_role_granted_manage_connections_may_post(ws_iam: Running) -> None:
    with connect(ws_iam.url) as client:
        connection_id = ws_iam.connection_id()
        _management_as(ws_iam, POSTER).post_to_connection(ConnectionId=connection_id, Data=b"hi")
        assert client.recv(timeout=5) == "hi"


def test_a_role_without_the_grant_is_refused_like_api_gateway_refuses(ws_iam: Running) -> None:
    with connect(ws_iam.url):
        connection_id = ws_iam.connection_id()
        for identity, operation in (
            (OUTSIDER, "post_to_connection"),
            (POSTER, "delete_connection"),
        ):
            client = _management_as(ws_iam, identity)
            arguments: dict[str, Any] = {"ConnectionId": connection_id}
            if operation == "post_to_connection":
                arguments["Data"] = b"x"
            with pytest.raises(ClientError) as refused:
                getattr(client, operation)(**arguments)
            error = refused.value.response["Error"]
            assert error["Code"] == "AccessDeniedException", error
            assert "execute-api:ManageConnections" in error["Message"]
        # A wrong secret fails the signature; an unknown key is not a token at all.
        with pytest.raises(ClientError) as forged:
            _management_as(ws_iam, POSTER, secret="guess").post_to_connection(
                ConnectionId=connection_id, Data=b"x"
            )
        assert forged.value.response["Error"]["Code"] == "InvalidSignatureException"
