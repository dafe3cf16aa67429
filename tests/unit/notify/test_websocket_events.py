"""The local WebSocket API: what it reads from the template and the events it builds.

The events must be what API Gateway sends: each is checked against Powertools' models of
API Gateway's WebSocket events (and the handlers' own), like the samples in events/.
"""

from __future__ import annotations

from typing import Any

import pytest
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayWebSocketConnectEventModel,
    APIGatewayWebSocketDisconnectEventModel,
    APIGatewayWebSocketMessageEventModel,
)
from websockets.datastructures import Headers

from gpuqueue.auth.access_token import bearer_token
from gpuqueue.notify.push import ConnectEvent, DisconnectEvent
from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.template import load_template
from gpuqueue_local.websocket_gateway import (
    ConnectionInfo,
    _status,
    connect_event,
    disconnect_event,
    message_event,
    new_connection_id,
    select_route,
    websocket_api,
)
from gpuqueue_testing import load_event

INFO = ConnectionInfo(
    connection_id="Yx2FhdqJoAMCJEQ=",
    source_ip="127.0.0.1",
    user_agent="Python/3.11 websockets/17.4",
    domain_name="127.0.0.1:41234",
)


def handshake_headers() -> Headers:
    return Headers(
        [
            ("Host", "127.0.0.1:41234"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("User-Agent", "Python/3.11 websockets/17.4"),
        ]
    )


# --- the template ---------------------------------------------------------------------------


def test_the_templates_websocket_api_is_found_with_its_stage_and_routes() -> None:
    api = websocket_api(load_template())

    assert api is not None
    assert api.stage == "v1"
    assert api.route_selection_expression == "$request.body.action"
    assert {key: route.function for key, route in api.routes.items()} == {
        "$connect": "ConnectFunction",
        "$disconnect": "DisconnectFunction",
    }


def test_routes_behind_fn_join_targets_and_route_responses_are_read() -> None:
    template: dict[str, Any] = {
        "Resources": {
            "Ws": {
                "Type": "AWS::ApiGatewayV2::Api",
                "Properties": {"ProtocolType": "WEBSOCKET", "RouteSelectionExpression": "$x"},
            },
            "Echo": {
                "Type": "AWS::ApiGatewayV2::Route",
                "Properties": {
                    "ApiId": {"Ref": "Ws"},
                    "RouteKey": "echo",
                    "Target": {"Fn::Join": ["/", ["integrations", {"Ref": "EchoIntegration"}]]},
                },
            },
            "EchoIntegration": {
                "Type": "AWS::ApiGatewayV2::Integration",
                "Properties": {
                    "ApiId": {"Ref": "Ws"},
                    "IntegrationType": "AWS_PROXY",
                    "IntegrationUri": {
                        "Fn::Join": [
                            "",
                            [
                                "arn:aws:apigateway:r:lambda:path/2015-03-31/functions/",
                                {"Fn::GetAtt": ["EchoFunction", "Arn"]},
                                "/invocations",
                            ],
                        ]
                    },
                },
            },
            "EchoResponse": {
                "Type": "AWS::ApiGatewayV2::RouteResponse",
                "Properties": {"ApiId": {"Ref": "Ws"}, "RouteId": {"Ref": "Echo"}},
            },
        }
    }

    api = websocket_api(template)

    assert api is not None
    assert api.routes["echo"].function == "EchoFunction"
    assert api.routes["echo"].two_way
    assert api.stage == "$default"


def test_a_template_without_a_websocket_api_has_none() -> None:
    assert websocket_api({"Resources": {}}) is None


# --- events ---------------------------------------------------------------------------------


def test_the_connect_event_is_api_gateways_with_the_query_token() -> None:
    event = connect_event(
        INFO, headers=handshake_headers(), query="token=abc.def.ghi", api_id="local", stage="v1"
    )

    APIGatewayWebSocketConnectEventModel.model_validate(event)
    parsed = ConnectEvent.model_validate(event)
    assert parsed.request_context.connection_id == INFO.connection_id
    assert parsed.request_context.route_key == "$connect"
    assert parsed.request_context.stage == "v1"
    assert bearer_token(parsed.headers, parsed.query_string_parameters) == "abc.def.ghi"
    assert event["multiValueQueryStringParameters"] == {"token": ["abc.def.ghi"]}
    # The upgrade itself is API Gateway's business, not the integration's.
    assert "Upgrade" not in event["headers"]
    assert "Connection" not in event["headers"]
    assert event["headers"]["Sec-WebSocket-Key"] == "dGhlIHNhbXBsZSBub25jZQ=="


def test_a_connect_without_a_query_string_has_no_query_parameters() -> None:
    event = connect_event(INFO, headers=handshake_headers(), query="", api_id="a", stage="v1")

    assert "queryStringParameters" not in event
    assert ConnectEvent.model_validate(event).query_string_parameters is None


def test_the_disconnect_event_carries_the_close_code() -> None:
    event = disconnect_event(INFO, code=1001, reason="Going away", api_id="local", stage="v1")

    APIGatewayWebSocketDisconnectEventModel.model_validate(event)
    parsed = DisconnectEvent.model_validate(event)
    assert parsed.request_context.disconnect_status_code == 1001
    assert parsed.request_context.disconnect_reason == "Going away"
    assert parsed.request_context.route_key == "$disconnect"


@pytest.mark.parametrize(("body", "binary"), [('{"action":"ping"}', False), (b"\x00\x01", True)])
def test_the_message_event_carries_the_body(body: str | bytes, binary: bool) -> None:
    event = message_event(INFO, body=body, route_key="$default", api_id="local", stage="v1")

    parsed = APIGatewayWebSocketMessageEventModel.model_validate(event)
    assert parsed.request_context.event_type == "MESSAGE"
    assert parsed.is_base64_encoded is binary


@pytest.mark.parametrize(
    ("name", "model"), [("connect_token", ConnectEvent), ("disconnect_client", DisconnectEvent)]
)
def test_the_sample_events_are_api_gateways_shape(name: str, model: type[Any]) -> None:
    model.model_validate(load_event(name))


def test_connection_ids_look_like_api_gateways() -> None:
    ids = {new_connection_id() for _ in range(100)}

    assert len(ids) == 100
    assert all(len(i) == 16 and i.endswith("=") for i in ids)


# --- routing and answers --------------------------------------------------------------------

ROUTES = {"$connect": 1, "$default": 1, "ping": 1}


@pytest.mark.parametrize(
    ("body", "route"),
    [
        ('{"action": "ping"}', "ping"),
        ('{"action": "unknown"}', "$default"),
        ('{"action": "$connect"}', "$default"),  # a client cannot pick a special route
        ('{"other": 1}', "$default"),
        ("not json", "$default"),
        (b"binary", "$default"),
    ],
)
def test_a_message_goes_to_the_route_its_action_names_else_default(
    body: str | bytes, route: str
) -> None:
    assert select_route("$request.body.action", body, ROUTES) == route


def test_a_message_no_route_takes_has_none() -> None:
    assert select_route("$request.body.action", '{"action": "x"}', {"$connect": 1}) is None


def test_nested_selection_paths_are_followed() -> None:
    assert select_route("$request.body.meta.op", '{"meta": {"op": "ping"}}', ROUTES) == "ping"


@pytest.mark.parametrize(
    ("result", "status"),
    [
        (InvocationResult(ok=True, payload={"statusCode": 200}), 200),
        (InvocationResult(ok=True, payload={"statusCode": 401, "body": "{}"}), 401),
        (InvocationResult(ok=True, payload=None), 200),
        (InvocationResult(ok=True, payload={"statusCode": "nope"}), 502),
        (InvocationResult(ok=False, error_type="Runtime.ExitError"), 502),
        (InvocationResult(ok=False, timed_out=True), 504),
    ],
)
def test_the_connect_functions_answer_becomes_the_handshakes_status(
    result: InvocationResult, status: int
) -> None:
    assert _status(result) == status
