"""Invariants of template.yaml's push over WebSocket: the API, its routes and permissions, the
connections table, and what each function may do."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_settings import BaseSettings

from gpuqueue import settings
from gpuqueue.notify.push import USER_INDEX
from gpuqueue_local.template import load_template, resources_of_type

TEMPLATE = load_template()
RESOURCES: dict[str, dict[str, Any]] = TEMPLATE["Resources"]


def props(logical_id: str) -> dict[str, Any]:
    properties: dict[str, Any] = RESOURCES[logical_id]["Properties"]
    return properties


def of_type(kind: str) -> dict[str, dict[str, Any]]:
    return resources_of_type(TEMPLATE, kind)


def statements(function: str) -> list[dict[str, Any]]:
    found = []
    for entry in props(function).get("Policies", []):
        if isinstance(entry, dict) and "Statement" in entry:
            found.extend(entry["Statement"])
    return found


def actions(function: str) -> dict[str, list[Any]]:
    """Every action an inline statement of the function allows, with its resources."""
    granted: dict[str, list[Any]] = {}
    for statement in statements(function):
        assert statement["Effect"] == "Allow"
        names = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        resources = statement["Resource"]
        for name in names:
            granted.setdefault(name, []).extend(
                resources if isinstance(resources, list) else [resources]
            )
    return granted


def test_the_websocket_api_routes_on_the_body_action() -> None:
    (api,) = [
        p["Properties"]
        for p in of_type("AWS::ApiGatewayV2::Api").values()
        if p["Properties"].get("ProtocolType") == "WEBSOCKET"
    ]

    assert api["RouteSelectionExpression"] == "$request.body.action"


def test_connect_and_disconnect_reach_their_functions_through_lambda_proxy_integrations() -> None:
    declared = of_type("AWS::ApiGatewayV2::Route").values()
    routes = {r["Properties"]["RouteKey"]: r["Properties"] for r in declared}
    expected = {"$connect": "ConnectFunction", "$disconnect": "DisconnectFunction"}

    assert set(expected) <= set(routes)
    for key, function in expected.items():
        integration_id = routes[key]["Target"]["Fn::Sub"].removeprefix("integrations/${")[:-1]
        integration = props(integration_id)
        assert integration["IntegrationType"] == "AWS_PROXY"
        assert f"${{{function}.Arn}}" in integration["IntegrationUri"]["Fn::Sub"]


@pytest.mark.parametrize(
    ("function", "route_key"),
    [("ConnectFunction", "$connect"), ("DisconnectFunction", "$disconnect")],
)
def test_api_gateway_may_invoke_each_route_function_for_its_route_only(
    function: str, route_key: str
) -> None:
    permissions = [
        p["Properties"]
        for p in of_type("AWS::Lambda::Permission").values()
        if p["Properties"]["FunctionName"] == {"Ref": function}
    ]

    assert len(permissions) == 1
    (permission,) = permissions
    assert permission["Principal"] == "apigateway.amazonaws.com"
    assert permission["SourceArn"]["Fn::Sub"].endswith(f"${{WebSocketApi}}/*/{route_key}")


def test_the_stage_deploys_itself_after_its_routes() -> None:
    (stage_id, stage) = next(iter(of_type("AWS::ApiGatewayV2::Stage").items()))

    assert stage["Properties"]["AutoDeploy"] is True
    assert {"WebSocketConnectRoute", "WebSocketDisconnectRoute"} <= set(stage["DependsOn"])
    assert stage_id == "WebSocketStage"


def test_the_connections_table_finds_a_users_connections_and_expires_them() -> None:
    table = props("ConnectionsTable")
    (index,) = table["GlobalSecondaryIndexes"]

    assert table["KeySchema"] == [{"AttributeName": "connection_id", "KeyType": "HASH"}]
    assert index["IndexName"] == USER_INDEX
    assert index["KeySchema"] == [{"AttributeName": "user_id", "KeyType": "HASH"}]
    assert "expires_at" in index["Projection"]["NonKeyAttributes"]  # stale rows are skipped
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert table["SSESpecification"]["SSEEnabled"] is True


def test_connect_may_only_add_connections_and_disconnect_only_remove_them() -> None:
    table = {"Fn::GetAtt": ["ConnectionsTable", "Arn"]}

    assert actions("ConnectFunction") == {"dynamodb:PutItem": [table]}
    assert actions("DisconnectFunction") == {"dynamodb:DeleteItem": [table]}


def test_task_events_may_read_a_users_connections_forget_them_and_post_on_this_stage() -> None:
    granted = actions("TaskEventsFunction")

    assert granted["dynamodb:Query"] == [
        {"Fn::GetAtt": ["ConnectionsTable", "Arn"]},
        {"Fn::Sub": f"${{ConnectionsTable.Arn}}/index/{USER_INDEX}"},
    ]
    assert {"Fn::GetAtt": ["ConnectionsTable", "Arn"]} in granted["dynamodb:DeleteItem"]
    (manage,) = granted["execute-api:ManageConnections"]
    assert manage["Fn::Sub"].endswith("${WebSocketApi}/${WebSocketStage}/POST/@connections/*")


def test_the_connect_function_checks_tokens_of_the_stacks_pool_and_client() -> None:
    env = props("ConnectFunction")["Environment"]["Variables"]

    issuer = "https://cognito-idp.${AWS::Region}.amazonaws.com/${UserPool}"
    assert env["TOKEN_ISSUER"] == {"Fn::Sub": issuer}
    # The same issuer the HTTP API's JWT authorizer trusts.
    jwt = props("HttpApi")["Auth"]["Authorizers"]["CognitoJwt"]["JwtConfiguration"]
    assert jwt["issuer"] == env["TOKEN_ISSUER"]
    assert env["JWKS_URL"] == {"Fn::Sub": issuer + "/.well-known/jwks.json"}
    assert env["USER_POOL_CLIENT_ID"] == {"Ref": "UserPoolClient"}


def test_task_events_posts_through_the_stages_management_endpoint() -> None:
    env = props("TaskEventsFunction")["Environment"]["Variables"]
    url = env["WEBSOCKET_MANAGEMENT_URL"]["Fn::Sub"]

    assert url == (
        "https://${WebSocketApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${WebSocketStage}"
    )
    assert env["CONNECTIONS_TABLE"] == {"Ref": "ConnectionsTable"}


def test_clients_learn_the_websocket_url_from_the_outputs() -> None:
    url = TEMPLATE["Outputs"]["WebSocketUrl"]["Value"]["Fn::Sub"]

    assert url.startswith("wss://${WebSocketApi}.execute-api.")
    assert url.endswith("/${WebSocketStage}")


@pytest.mark.parametrize(
    ("function", "model"),
    [
        ("ConnectFunction", settings.ConnectSettings),
        ("DisconnectFunction", settings.DisconnectSettings),
    ],
)
def test_the_template_sets_every_required_setting(function: str, model: type[BaseSettings]) -> None:
    required = {name.upper() for name, field in model.model_fields.items() if field.is_required()}
    env = set(props(function)["Environment"]["Variables"])

    assert required - env == set()
