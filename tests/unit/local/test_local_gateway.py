"""The local API Gateway: route matching, payload-2.0 events, the JWT authorizer, responses."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fakes import FakeSpec, RecordingFunction
from gpuqueue_local.gateway import ApiGateway, JwtAuthorizer, JwtVerifier, Route, Unauthorized
from gpuqueue_local.lambda_runtime import InvocationResult

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_local"
CLIENT_ID = "app-client-1"
API_SCOPE = "gpuqueue/api"
AUTHORIZER = JwtAuthorizer(
    issuer=ISSUER,
    audience=(CLIENT_ID,),
    scopes=(API_SCOPE,),
    jwks_url="http://127.0.0.1:1/us-east-1_local/.well-known/jwks.json",
)


# --- Fakes -----------------------------------------------------------------------------


@dataclass
class FakeVerifier:
    """Accepts with the given claims, or refuses when there are none."""

    claims: dict[str, Any] | None = None
    calls: list[tuple[str | None, JwtAuthorizer, tuple[str, ...]]] = field(default_factory=list)

    def verify(
        self, authorization: str | None, authorizer: JwtAuthorizer, scopes: tuple[str, ...]
    ) -> dict[str, Any]:
        self.calls.append((authorization, authorizer, scopes))
        if self.claims is None:
            raise Unauthorized("refused")
        return self.claims


def route(key: str, function: str = "Fn", *, authorizer: JwtAuthorizer | None = None) -> Route:
    """A route from a route key: "GET /path", "ANY /path" or "$default"."""
    if key == "$default":
        return Route(method="ANY", path="$default", function=function, authorizer=authorizer)
    method, path = key.split(" ", 1)
    return Route(method=method, path=path, function=function, authorizer=authorizer)


def api(
    *routes: Route,
    functions: dict[str, RecordingFunction] | None = None,
    verifier: FakeVerifier | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> ApiGateway:
    fakes: Any = functions if functions is not None else {"Fn": RecordingFunction()}
    checker: Any = verifier if verifier is not None else FakeVerifier()
    return ApiGateway(routes=list(routes), functions=fakes, verifier=checker, ready=ready)


def call(
    gw: ApiGateway,
    method: str,
    raw_path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    status, response_headers, raw = gw.handle(method, raw_path, headers or {}, body, "127.0.0.1")
    return status, response_headers, raw


def invoke_event(
    method: str,
    raw_path: str,
    *,
    route_key: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    verifier: FakeVerifier | None = None,
    authorizer: JwtAuthorizer | None = None,
) -> dict[str, Any]:
    """The event one request hands the function."""
    function = RecordingFunction()
    gw = api(route(route_key, authorizer=authorizer), functions={"Fn": function}, verifier=verifier)
    call(gw, method, raw_path, headers=headers, body=body)
    return function.event


def respond(
    result: InvocationResult, *, timeout_seconds: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """The HTTP response the gateway gives for one invocation result."""
    function = RecordingFunction(result=result, spec=FakeSpec(timeout_seconds))
    return call(api(route("GET /x"), functions={"Fn": function}), "GET", "/x")


# --- Route.match -----------------------------------------------------------------------


def test_literal_route_matches_only_its_exact_path() -> None:
    literal = route("GET /api/v1/tasks")

    assert literal.match("GET", "/api/v1/tasks") == {}
    assert literal.match("GET", "/api/v1/tasks/") is None
    assert literal.match("GET", "/api/v1/tasks/123") is None
    assert literal.match("GET", "/api/v1") is None


def test_literal_route_needs_its_method() -> None:
    assert route("GET /api/v1/tasks").match("POST", "/api/v1/tasks") is None


def test_parameter_route_captures_one_path_segment() -> None:
    param = route("GET /api/v1/tasks/{task_id}")

    assert param.match("GET", "/api/v1/tasks/abc-123") == {"task_id": "abc-123"}
    assert param.match("GET", "/api/v1/tasks/abc/more") is None
    assert param.match("GET", "/api/v1/tasks/") is None


def test_route_with_several_parameters_captures_each() -> None:
    param = route("GET /users/{user}/tasks/{task_id}")

    assert param.match("GET", "/users/u1/tasks/t9") == {"user": "u1", "task_id": "t9"}


def test_greedy_route_captures_the_rest_of_the_path() -> None:
    greedy = route("GET /files/{proxy+}")

    assert greedy.match("GET", "/files/a") == {"proxy": "a"}
    assert greedy.match("GET", "/files/a/b/c.png") == {"proxy": "a/b/c.png"}


def test_greedy_route_does_not_match_its_bare_prefix() -> None:
    greedy = route("GET /files/{proxy+}")

    assert greedy.match("GET", "/files/") is None
    assert greedy.match("GET", "/files") is None


def test_any_method_route_matches_every_method() -> None:
    anything = route("ANY /api/v1/tasks/{task_id}")

    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        assert anything.match(method, "/api/v1/tasks/t1") == {"task_id": "t1"}


def test_default_route_matches_any_method_and_path() -> None:
    default = route("$default")

    assert default.match("GET", "/") == {}
    assert default.match("DELETE", "/no/such/thing") == {}


def test_route_keys_read_like_api_gateways() -> None:
    assert route("GET /api/v1/tasks/{task_id}").route_key == "GET /api/v1/tasks/{task_id}"
    assert route("ANY /files/{proxy+}").route_key == "ANY /files/{proxy+}"
    assert route("$default").route_key == "$default"


# --- ApiGateway.find_route precedence ---------------------------------------------------


def chosen(gw: ApiGateway, method: str, path: str) -> str | None:
    found = gw.find_route(method, path)
    return found[0].function if found else None


def test_literal_route_beats_parameter_route() -> None:
    gw = api(route("GET /api/v1/tasks/{task_id}", "Param"), route("GET /api/v1/tasks/stats", "Lit"))

    assert chosen(gw, "GET", "/api/v1/tasks/stats") == "Lit"
    assert chosen(gw, "GET", "/api/v1/tasks/other") == "Param"


def test_parameter_route_beats_greedy_route() -> None:
    gw = api(route("GET /api/{proxy+}", "Greedy"), route("GET /api/{name}", "Param"))

    assert chosen(gw, "GET", "/api/one") == "Param"
    assert chosen(gw, "GET", "/api/one/two") == "Greedy"


def test_greedy_route_beats_default_route() -> None:
    gw = api(route("$default", "Default"), route("ANY /api/{proxy+}", "Greedy"))

    assert chosen(gw, "GET", "/api/anything/at/all") == "Greedy"
    assert chosen(gw, "GET", "/elsewhere") == "Default"


def test_route_of_another_method_falls_through_to_a_less_specific_route() -> None:
    gw = api(route("GET /api/v1/tasks", "List"), route("ANY /api/{proxy+}", "Greedy"))

    assert chosen(gw, "DELETE", "/api/v1/tasks") == "Greedy"


def test_find_route_returns_the_path_parameters() -> None:
    gw = api(route("GET /api/v1/tasks/{task_id}"))

    found = gw.find_route("GET", "/api/v1/tasks/t-42")

    assert found is not None
    assert found[1] == {"task_id": "t-42"}


def test_no_matching_route_and_no_default_finds_nothing() -> None:
    gw = api(route("GET /api/v1/tasks"))

    assert gw.find_route("GET", "/api/v2/tasks") is None


def test_explicit_method_beats_any_on_the_same_path() -> None:
    gw = api(route("ANY /api/v1/tasks", "Any"), route("GET /api/v1/tasks", "Get"))

    assert chosen(gw, "GET", "/api/v1/tasks") == "Get"


def test_any_catches_the_methods_its_path_does_not_define() -> None:
    gw = api(route("GET /api/v1/tasks", "Get"), route("ANY /api/v1/tasks", "Any"))

    assert chosen(gw, "DELETE", "/api/v1/tasks") == "Any"


# --- ApiGateway.handle: the payload-2.0 event -------------------------------------------


def test_event_is_payload_format_2_with_route_and_path() -> None:
    event = invoke_event(
        "GET", "/api/v1/tasks/t-1?limit=5", route_key="GET /api/v1/tasks/{task_id}"
    )

    assert event["version"] == "2.0"
    assert event["routeKey"] == "GET /api/v1/tasks/{task_id}"
    assert event["rawPath"] == "/api/v1/tasks/t-1"
    assert event["rawQueryString"] == "limit=5"
    assert event["requestContext"]["routeKey"] == "GET /api/v1/tasks/{task_id}"
    assert event["requestContext"]["http"]["method"] == "GET"
    assert event["requestContext"]["http"]["path"] == "/api/v1/tasks/t-1"
    assert event["requestContext"]["http"]["sourceIp"] == "127.0.0.1"
    assert event["requestContext"]["stage"] == "$default"


def test_event_carries_the_path_parameters() -> None:
    event = invoke_event("DELETE", "/api/v1/tasks/t-9", route_key="DELETE /api/v1/tasks/{task_id}")

    assert event["pathParameters"] == {"task_id": "t-9"}


def test_event_query_parameters_join_repeated_keys_with_commas() -> None:
    event = invoke_event("GET", "/search?tag=a&tag=b&q=fox&empty=", route_key="GET /search")

    assert event["rawQueryString"] == "tag=a&tag=b&q=fox&empty="
    assert event["queryStringParameters"] == {"tag": "a,b", "q": "fox", "empty": ""}


def test_event_without_query_or_parameters_omits_them() -> None:
    event = invoke_event("GET", "/search", route_key="GET /search")

    assert event["rawQueryString"] == ""
    assert "queryStringParameters" not in event
    assert "pathParameters" not in event
    assert "body" not in event


def test_event_headers_are_lowercased() -> None:
    event = invoke_event(
        "GET",
        "/x",
        route_key="GET /x",
        headers={"X-Custom-Header": "Value", "User-Agent": "tests/1.0"},
    )

    assert event["headers"] == {"x-custom-header": "Value", "user-agent": "tests/1.0"}
    assert event["requestContext"]["http"]["userAgent"] == "tests/1.0"


def test_event_carries_the_authorizers_claims_as_strings_with_lists_flattened() -> None:
    verifier = FakeVerifier(
        claims={
            "sub": "user-1",
            "cognito:groups": ["admins", "users"],
            "exp": 1_900_000_000,
            "scope": "gpuqueue/api openid",
        }
    )

    event = invoke_event(
        "GET",
        "/x",
        route_key="GET /x",
        headers={"Authorization": "Bearer t"},
        verifier=verifier,
        authorizer=AUTHORIZER,
    )

    jwt_context = event["requestContext"]["authorizer"]["jwt"]
    assert jwt_context["claims"] == {
        "sub": "user-1",
        "cognito:groups": "[admins users]",
        "exp": "1900000000",
        "scope": "gpuqueue/api openid",
    }
    assert jwt_context["scopes"] == ["gpuqueue/api", "openid"]


def test_event_json_body_is_text() -> None:
    body = json.dumps({"prompt": "a red fox"}).encode()

    event = invoke_event(
        "POST",
        "/x",
        route_key="POST /x",
        headers={"Content-Type": "application/json; charset=utf-8"},
        body=body,
    )

    assert event["body"] == '{"prompt": "a red fox"}'
    assert event["isBase64Encoded"] is False


def test_event_binary_body_is_base64_encoded() -> None:
    body = bytes(range(256))

    event = invoke_event(
        "POST",
        "/x",
        route_key="POST /x",
        headers={"Content-Type": "application/octet-stream"},
        body=body,
    )

    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body


# --- ApiGateway.handle: authorization ----------------------------------------------------


def test_protected_route_answers_401_when_the_token_is_refused() -> None:
    function = RecordingFunction()
    verifier = FakeVerifier(claims=None)
    gw = api(
        route("GET /secret", authorizer=AUTHORIZER), functions={"Fn": function}, verifier=verifier
    )

    status, _, body = call(gw, "GET", "/secret", headers={"Authorization": "Bearer bad"})

    assert status == 401
    assert json.loads(body) == {"message": "Unauthorized"}
    assert function.calls == []


def test_protected_route_hands_the_verifier_the_header_and_route_scopes() -> None:
    verifier = FakeVerifier(claims={"sub": "u"})
    secret = Route(
        method="GET", path="/secret", function="Fn", authorizer=AUTHORIZER, scopes=("admin",)
    )
    gw = api(secret, verifier=verifier)

    status, _, _ = call(gw, "GET", "/secret", headers={"AUTHORIZATION": "Bearer tok"})

    assert status == 200
    assert verifier.calls == [("Bearer tok", AUTHORIZER, ("admin",))]


def test_public_route_skips_the_verifier() -> None:
    function = RecordingFunction()
    verifier = FakeVerifier(claims=None)
    gw = api(route("POST /login"), functions={"Fn": function}, verifier=verifier)

    status, _, _ = call(gw, "POST", "/login")

    assert status == 200
    assert verifier.calls == []
    assert "authorizer" not in function.event["requestContext"]


# --- ApiGateway.handle: gateway answers without the function ----------------------------


def test_health_answers_200_when_ready() -> None:
    status, _, body = call(api(ready=lambda: True), "GET", "/health")

    assert status == 200
    assert json.loads(body) == {"status": "ok"}


def test_health_answers_503_until_ready() -> None:
    status, _, _ = call(api(ready=lambda: False), "GET", "/health")

    assert status == 503


def test_body_over_10_mb_answers_413_without_invoking() -> None:
    function = RecordingFunction()
    gw = api(route("POST /x"), functions={"Fn": function})

    status, _, _ = call(gw, "POST", "/x", body=b"x" * (10 * 1024 * 1024 + 1))

    assert status == 413
    assert function.calls == []


def test_body_of_exactly_10_mb_is_accepted() -> None:
    gw = api(route("POST /x"))

    status, _, _ = call(gw, "POST", "/x", body=b"x" * (10 * 1024 * 1024))

    assert status == 200


def test_unknown_route_answers_404() -> None:
    status, _, body = call(api(route("GET /x")), "GET", "/y")

    assert status == 404
    assert json.loads(body) == {"message": "Not Found"}


# --- ApiGateway.handle: response mapping ----------------------------------------------


def test_function_response_sets_status_headers_and_body() -> None:
    result = InvocationResult(
        ok=True,
        payload={
            "statusCode": 201,
            "headers": {"Content-Type": "text/plain", "X-Task-Id": "t-1"},
            "body": "created",
        },
    )

    status, headers, body = respond(result)

    assert status == 201
    assert headers == {"content-type": "text/plain", "x-task-id": "t-1"}
    assert body == b"created"


def test_function_response_without_content_type_is_json() -> None:
    status, headers, _ = respond(InvocationResult(ok=True, payload={"statusCode": 204}))

    assert status == 204
    assert headers["content-type"] == "application/json"


def test_base64_response_body_is_decoded() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    result = InvocationResult(
        ok=True,
        payload={
            "statusCode": 200,
            "headers": {"content-type": "image/png"},
            "body": base64.b64encode(png).decode(),
            "isBase64Encoded": True,
        },
    )

    _, _, body = respond(result)

    assert body == png


def test_bare_payload_answers_200_with_it_as_json() -> None:
    status, headers, body = respond(InvocationResult(ok=True, payload={"hello": "world"}))

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"hello": "world"}


def test_bare_non_dict_payload_answers_200_with_it_as_json() -> None:
    status, _, body = respond(InvocationResult(ok=True, payload=[1, "two"]))

    assert status == 200
    assert json.loads(body) == [1, "two"]


def test_timed_out_invocation_answers_503() -> None:
    result = InvocationResult(ok=False, error_type="Sandbox.Timedout", timed_out=True)

    status, _, body = respond(result)

    assert status == 503
    assert json.loads(body) == {"message": "Service Unavailable"}


def test_function_error_answers_500() -> None:
    result = InvocationResult(ok=False, error_type="ValueError", error_message="boom")

    status, _, body = respond(result)

    assert status == 500
    assert json.loads(body) == {"message": "Internal Server Error"}


def test_invalid_status_code_answers_500() -> None:
    status, _, _ = respond(InvocationResult(ok=True, payload={"statusCode": "teapot"}))

    assert status == 500


def test_integration_timeout_caps_a_long_function_timeout_at_30_seconds() -> None:
    function = RecordingFunction(spec=FakeSpec(900.0))

    call(api(route("GET /x"), functions={"Fn": function}), "GET", "/x")

    assert function.calls[0][1] == 30.0


def test_integration_timeout_is_the_function_timeout_when_shorter() -> None:
    function = RecordingFunction(spec=FakeSpec(5.0))

    call(api(route("GET /x"), functions={"Fn": function}), "GET", "/x")

    assert function.calls[0][1] == 5.0


def test_request_reaches_the_function_its_route_names() -> None:
    tasks, stats = RecordingFunction(), RecordingFunction()
    gw = api(
        route("GET /api/v1/tasks", "Tasks"),
        route("GET /api/v1/system/stats", "Stats"),
        functions={"Tasks": tasks, "Stats": stats},
    )

    call(gw, "GET", "/api/v1/system/stats")

    assert (len(tasks.calls), len(stats.calls)) == (0, 1)


# --- JwtVerifier -------------------------------------------------------------------------


@dataclass
class FakeSigningKey:
    key: Any


@dataclass
class FakeJwksClient:
    public_key: Any

    def get_signing_key_from_jwt(self, token: str) -> FakeSigningKey:
        return FakeSigningKey(self.public_key)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def verifier(signing_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> JwtVerifier:
    checker = JwtVerifier()
    jwks = FakeJwksClient(signing_key.public_key())
    monkeypatch.setattr(checker, "_client", lambda url: jwks)
    return checker


def make_token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    """A Cognito-style access token; a claim given as None is left out."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "user-1",
        "iss": ISSUER,
        "client_id": CLIENT_ID,
        "token_use": "access",
        "scope": f"{API_SCOPE} openid",
        "username": "alice",
        "iat": now,
        "exp": now + 3600,
    }
    base.update(claims)
    payload = {k: v for k, v in base.items() if v is not None}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "local-key"})


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_valid_access_token_yields_its_claims(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    claims = verifier.verify(bearer(make_token(signing_key)), AUTHORIZER, ())

    assert claims["sub"] == "user-1"
    assert claims["username"] == "alice"


def test_expired_token_is_refused(verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    token = make_token(signing_key, iat=int(time.time()) - 7200, exp=int(time.time()) - 60)

    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUTHORIZER, ())


def test_token_without_expiry_is_refused(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(make_token(signing_key, exp=None)), AUTHORIZER, ())


def test_token_from_another_issuer_is_refused(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    token = make_token(signing_key, iss="https://cognito-idp.us-east-1.amazonaws.com/other")

    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUTHORIZER, ())


def test_access_token_for_another_client_is_refused(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(make_token(signing_key, client_id="other")), AUTHORIZER, ())


def test_token_for_another_audience_is_refused(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    token = make_token(signing_key, client_id=None, aud="other", token_use="id")

    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUTHORIZER, ())


def test_token_signed_by_another_key_is_refused(verifier: JwtVerifier) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    with pytest.raises(Unauthorized):
        verifier.verify(bearer(make_token(stranger)), AUTHORIZER, ())


def test_token_without_the_authorizers_scope_is_refused(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify(bearer(make_token(signing_key, scope="openid")), AUTHORIZER, ())


def test_route_scopes_replace_the_authorizers_scopes(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    token = bearer(make_token(signing_key, scope=API_SCOPE))

    with pytest.raises(Unauthorized):
        verifier.verify(token, AUTHORIZER, ("gpuqueue/admin",))


def test_any_one_of_the_required_scopes_is_enough(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    token = bearer(make_token(signing_key, scope="gpuqueue/admin"))

    claims = verifier.verify(token, AUTHORIZER, ("gpuqueue/api", "gpuqueue/admin"))

    assert claims["sub"] == "user-1"


def test_id_token_with_matching_audience_is_accepted_when_it_has_the_scope(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    token = make_token(signing_key, client_id=None, aud=CLIENT_ID, token_use="id")

    claims = verifier.verify(bearer(token), AUTHORIZER, ())

    assert claims["aud"] == CLIENT_ID


def test_id_token_without_scope_is_refused_where_scopes_are_required(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    token = make_token(signing_key, client_id=None, aud=CLIENT_ID, token_use="id", scope=None)

    with pytest.raises(Unauthorized):
        verifier.verify(bearer(token), AUTHORIZER, ())


def test_id_token_without_scope_is_accepted_where_no_scopes_are_required(
    verifier: JwtVerifier, signing_key: rsa.RSAPrivateKey
) -> None:
    token = make_token(signing_key, client_id=None, aud=CLIENT_ID, token_use="id", scope=None)
    no_scopes = JwtAuthorizer(
        issuer=ISSUER, audience=(CLIENT_ID,), scopes=(), jwks_url=AUTHORIZER.jwks_url
    )

    claims = verifier.verify(bearer(token), no_scopes, ())

    assert claims["sub"] == "user-1"


def test_garbage_token_is_refused(verifier: JwtVerifier) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify("Bearer not.a.jwt", AUTHORIZER, ())


@pytest.mark.parametrize("authorization", [None, ""])
def test_missing_authorization_header_is_refused(
    verifier: JwtVerifier, authorization: str | None
) -> None:
    with pytest.raises(Unauthorized):
        verifier.verify(authorization, AUTHORIZER, ())
