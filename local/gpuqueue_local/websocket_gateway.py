"""A local API Gateway WebSocket API: the template's routes, and its management API.

Read from template.yaml: the `AWS::ApiGatewayV2::Api` with ProtocolType WEBSOCKET, its stage,
its routes and the Lambda proxy integrations behind them. Served with `websockets` on
127.0.0.1 as API Gateway serves it:

- handshake -> the `$connect` route's function, with the event API Gateway sends (headers,
  query string, connection id...); the client gets its 101 only if the function answers
  2xx, else the handshake is refused with the function's status (401 for a bad token);
- each message -> the route `RouteSelectionExpression` (`$request.body.action`) picks, else
  `$default`; a route with a route response sends the function's `body` back;
- close (either side) -> `$disconnect`, with the close code;
- the management API, `POST`/`GET`/`DELETE /{stage}/@connections/{id}`, on its own port:
  boto3's `apigatewaymanagementapi` client works against it (`endpoint_url`); an unknown or
  closed connection is 410 GoneException.

Limits kept: 128 KB messages (a bigger post is 413), 10 min idle timeout, 2 h connections.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from gpuqueue_local.emulator_iam import EmulatorIam
from gpuqueue_local.lambda_runtime import FunctionRuntime, InvocationResult
from gpuqueue_local.moto_iam import ACCOUNT_ID

MAX_MESSAGE_BYTES = 128 * 1024  # API Gateway's WebSocket message payload quota
IDLE_TIMEOUT_SECONDS = 600.0  # API Gateway closes a connection idle for 10 minutes
MAX_CONNECTION_SECONDS = 7200.0  # ... and any connection after 2 hours
INTEGRATION_TIMEOUT_SECONDS = 29.0
GOING_AWAY = 1001
NO_STATUS = 1005
# Handshake headers API Gateway does not hand the $connect integration.
_HOP_HEADERS = {"connection", "upgrade"}
_FUNCTION_ARN = re.compile(r"\$\{([A-Za-z0-9]+)\.Arn\}")
_MANAGEMENT_PATH = re.compile(r"^/(?P<stage>[^/]+)/@connections/(?P<connection>[^/]+)$")


# --- what the template declares -------------------------------------------------------------


@dataclass(frozen=True)
class WebSocketRoute:
    route_key: str  # "$connect", "$disconnect", "$default" or an action name
    function: str  # the logical id of the Lambda behind the route's AWS_PROXY integration
    two_way: bool = False  # a route response exists: the function's body goes back


@dataclass(frozen=True)
class WebSocketApiSpec:
    logical_id: str
    stage: str
    route_selection_expression: str
    routes: Mapping[str, WebSocketRoute]


def _ref(value: Any) -> str | None:
    return str(value["Ref"]) if isinstance(value, dict) and set(value) == {"Ref"} else None


def _sub_text(value: Any) -> str:
    """An Fn::Sub's text (or an Fn::Join's, its Refs and GetAtts written as ${...})."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        arg = value["Fn::Sub"]
        return str(arg if isinstance(arg, str) else arg[0])
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return str(separator).join(_sub_text(part) for part in parts)
    if isinstance(value, dict) and "Ref" in value:
        return f"${{{value['Ref']}}}"
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        target = value["Fn::GetAtt"]
        return f"${{{target if isinstance(target, str) else '.'.join(target)}}}"
    return str(value)


def _integration_function(integration: Mapping[str, Any]) -> str | None:
    props = integration.get("Properties", {})
    if props.get("IntegrationType") != "AWS_PROXY":
        return None
    found = _FUNCTION_ARN.search(_sub_text(props.get("IntegrationUri", "")))
    return found.group(1) if found else None


def websocket_api(template: Mapping[str, Any]) -> WebSocketApiSpec | None:
    """The template's WebSocket API (None when it has none)."""
    resources: Mapping[str, Any] = template.get("Resources", {})

    def of_type(kind: str, api: str) -> dict[str, dict[str, Any]]:
        return {
            name: r
            for name, r in resources.items()
            if r.get("Type") == kind and _ref(r.get("Properties", {}).get("ApiId")) == api
        }

    for api_id, api in resources.items():
        props = api.get("Properties", {})
        if api.get("Type") != "AWS::ApiGatewayV2::Api" or props.get("ProtocolType") != "WEBSOCKET":
            continue
        stages = of_type("AWS::ApiGatewayV2::Stage", api_id)
        stage = next((str(s["Properties"]["StageName"]) for s in stages.values()), "$default")
        route_responses = {
            _ref(r["Properties"].get("RouteId"))
            for r in of_type("AWS::ApiGatewayV2::RouteResponse", api_id).values()
        }
        routes = {}
        for route_id, route in of_type("AWS::ApiGatewayV2::Route", api_id).items():
            route_props = route["Properties"]
            target = re.fullmatch(r"integrations/\$\{(\w+)\}", _sub_text(route_props["Target"]))
            integration = resources.get(target.group(1), {}) if target else {}
            function = _integration_function(integration)
            if function is None:
                continue  # only Lambda proxy integrations are emulated
            key = str(route_props["RouteKey"])
            routes[key] = WebSocketRoute(key, function, two_way=route_id in route_responses)
        return WebSocketApiSpec(
            logical_id=api_id,
            stage=stage,
            route_selection_expression=str(
                props.get("RouteSelectionExpression", "$request.body.action")
            ),
            routes=routes,
        )
    return None


# --- the events API Gateway sends -----------------------------------------------------------


def _request_id() -> str:
    return base64.b64encode(os.urandom(10)).decode()


def new_connection_id() -> str:
    """Shaped like API Gateway's (16 characters, base64 of 10 bytes, URL-safe here)."""
    return base64.urlsafe_b64encode(os.urandom(10)).decode()


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


@dataclass
class ConnectionInfo:
    connection_id: str
    source_ip: str
    user_agent: str
    domain_name: str
    connected_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_active_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _request_context(
    info: ConnectionInfo,
    *,
    api_id: str,
    stage: str,
    route_key: str,
    event_type: str,
    **extra: Any,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    identity: dict[str, str] = {"sourceIp": info.source_ip}
    if info.user_agent:
        identity["userAgent"] = info.user_agent
    return {
        "routeKey": route_key,
        **extra,
        "eventType": event_type,
        "extendedRequestId": _request_id(),
        "requestTime": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
        "messageDirection": "IN",
        "stage": stage,
        "connectedAt": _ms(info.connected_at),
        "requestTimeEpoch": _ms(now),
        "identity": identity,
        "requestId": _request_id(),
        "domainName": info.domain_name,
        "connectionId": info.connection_id,
        "apiId": api_id,
    }


def connect_event(
    info: ConnectionInfo, *, headers: Headers, query: str, api_id: str, stage: str
) -> dict[str, Any]:
    """The `$connect` event: the handshake's headers (original case) and query string."""
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for name, value in headers.raw_items():
        if name.lower() in _HOP_HEADERS:
            continue
        single[name] = value
        multi.setdefault(name, []).append(value)
    forwarded = {
        "X-Amzn-Trace-Id": f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}",
        "X-Forwarded-For": info.source_ip,
        "X-Forwarded-Port": info.domain_name.rsplit(":", 1)[-1],
        "X-Forwarded-Proto": "http",
    }
    for name, value in forwarded.items():
        single.setdefault(name, value)
        multi.setdefault(name, [value])
    event: dict[str, Any] = {"headers": single, "multiValueHeaders": multi}
    params: dict[str, str] = {}
    multi_params: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        params[name] = value  # the last one, as API Gateway does
        multi_params.setdefault(name, []).append(value)
    if params:
        event["queryStringParameters"] = params
        event["multiValueQueryStringParameters"] = multi_params
    event["requestContext"] = _request_context(
        info, api_id=api_id, stage=stage, route_key="$connect", event_type="CONNECT"
    )
    event["isBase64Encoded"] = False
    return event


def disconnect_event(
    info: ConnectionInfo, *, code: int, reason: str, api_id: str, stage: str
) -> dict[str, Any]:
    headers = {
        "Host": info.domain_name,
        "x-api-key": "",
        "X-Forwarded-For": "",
        "x-restapi": "",
    }
    return {
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "requestContext": _request_context(
            info,
            api_id=api_id,
            stage=stage,
            route_key="$disconnect",
            event_type="DISCONNECT",
            disconnectStatusCode=code,
            disconnectReason=reason,
        ),
        "isBase64Encoded": False,
    }


def message_event(
    info: ConnectionInfo, *, body: str | bytes, route_key: str, api_id: str, stage: str
) -> dict[str, Any]:
    binary = isinstance(body, bytes)
    return {
        "requestContext": _request_context(
            info,
            api_id=api_id,
            stage=stage,
            route_key=route_key,
            event_type="MESSAGE",
            messageId=_request_id(),
        ),
        "body": base64.b64encode(body).decode() if isinstance(body, bytes) else body,
        "isBase64Encoded": binary,
    }


def select_route(expression: str, body: str | bytes, routes: Mapping[str, Any]) -> str | None:
    """The route key a message goes to: `$request.body.<path>` of a JSON body if a route has
    that key, else `$default` (None: no route takes it)."""
    prefix = "$request.body."
    if expression.startswith(prefix) and isinstance(body, str):
        try:
            value: Any = json.loads(body)
        except ValueError:
            value = None
        for part in expression[len(prefix) :].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and value in routes and not value.startswith("$"):
            return value
    return "$default" if "$default" in routes else None


def _status(result: InvocationResult) -> int:
    """A proxy integration's answer as the handshake's status (errors: 502, timeout: 504)."""
    if result.timed_out:
        return HTTPStatus.GATEWAY_TIMEOUT.value
    if not result.ok:
        return HTTPStatus.BAD_GATEWAY.value
    payload = result.payload
    if not isinstance(payload, dict) or "statusCode" not in payload:
        return HTTPStatus.OK.value
    try:
        status = HTTPStatus(int(payload["statusCode"]))
    except (TypeError, ValueError):
        return HTTPStatus.BAD_GATEWAY.value
    return status.value


# --- the gateway ------------------------------------------------------------------------------


@dataclass
class _Open:
    info: ConnectionInfo
    connection: ServerConnection


@dataclass
class WebSocketGateway:
    api: WebSocketApiSpec
    functions: Mapping[str, FunctionRuntime] = field(default_factory=dict)
    api_id: str = "local"
    region: str = "us-east-1"
    # Checks each management call's SigV4 and the caller's policies (None: anyone may call).
    iam: EmulatorIam | None = None
    ready: Callable[[], bool] = lambda: True
    log: Callable[[str], None] | None = None
    idle_timeout_s: float = IDLE_TIMEOUT_SECONDS
    max_connection_s: float = MAX_CONNECTION_SECONDS
    _open: dict[str, _Open] = field(default_factory=dict)
    _pending: dict[ServerConnection, ConnectionInfo] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Server | None = None
    _management: ThreadingHTTPServer | None = None
    url: str = ""
    management_url: str = ""

    # --- lifecycle

    def start(self, host: str, port: int = 0, management_port: int = 0) -> None:
        self._server = serve(
            self._serve_connection,
            host,
            port,
            process_request=self._handshake,
            server_header="gpuqueue-local-websocket",
            open_timeout=INTEGRATION_TIMEOUT_SECONDS + 5,
            max_size=MAX_MESSAGE_BYTES,
            ping_interval=None,  # API Gateway sends no pings; clients may
            compression=None,
        )
        threading.Thread(
            target=self._server.serve_forever, daemon=True, name="websocket-gateway"
        ).start()
        self._management = ThreadingHTTPServer((host, management_port), self._management_handler())
        self._management.daemon_threads = True
        threading.Thread(
            target=self._management.serve_forever, daemon=True, name="websocket-management"
        ).start()
        ws_port = self._server.socket.getsockname()[1]
        self.url = f"ws://{host}:{ws_port}/{self.api.stage}"
        self.management_url = f"http://{host}:{self._management.server_address[1]}/{self.api.stage}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        if self._management is not None:
            self._management.shutdown()
        with self._lock:
            opened = list(self._open.values())
        for entry in opened:
            entry.connection.close(GOING_AWAY, "Going away")

    def connection_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    # --- the WebSocket side

    def _invoke(self, route_key: str, event: dict[str, Any]) -> InvocationResult | None:
        route = self.api.routes.get(route_key)
        if route is None:
            return None
        runtime = self.functions[route.function]
        timeout = min(INTEGRATION_TIMEOUT_SECONDS, runtime.spec.timeout_seconds)
        return runtime.invoke(event, timeout_seconds=timeout)

    def _handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        split = urlsplit(request.path)
        if split.path.rstrip("/") != f"/{self.api.stage}":
            return _refuse(connection, HTTPStatus.FORBIDDEN, "Forbidden")
        if not self.ready() or not self.functions:
            return _refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable")
        info = ConnectionInfo(
            connection_id=new_connection_id(),
            source_ip=str(connection.remote_address[0]),
            user_agent=request.headers.get("User-Agent", ""),
            domain_name=request.headers.get("Host", "127.0.0.1"),
        )
        event = connect_event(
            info, headers=request.headers, query=split.query, api_id=self.api_id,
            stage=self.api.stage,
        )  # fmt: skip
        result = self._invoke("$connect", event)
        status = HTTPStatus.OK.value if result is None else _status(result)
        if not 200 <= status < 300:
            self._say(f"$connect refused ({status})")
            return _refuse(connection, status, _reason(status))
        with self._lock:
            self._pending[connection] = info
        return None

    def _serve_connection(self, connection: ServerConnection) -> None:
        with self._lock:
            info = self._pending.pop(connection)
            self._open[info.connection_id] = _Open(info, connection)
        self._say(f"connected {info.connection_id}")
        deadline = time.monotonic() + self.max_connection_s
        try:
            while True:
                idle_ends = info.last_active_at.timestamp() + self.idle_timeout_s - time.time()
                wait = min(idle_ends, deadline - time.monotonic())
                if wait <= 0:
                    connection.close(GOING_AWAY, "Going away")
                    break
                try:
                    message = connection.recv(timeout=wait)
                except TimeoutError:
                    continue
                info.last_active_at = datetime.now(UTC)
                self._on_message(info, connection, message)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._open.pop(info.connection_id, None)
            self._disconnected(info, connection)

    def _on_message(
        self, info: ConnectionInfo, connection: ServerConnection, message: str | bytes
    ) -> None:
        route_key = select_route(self.api.route_selection_expression, message, self.api.routes)
        request_id = _request_id()
        if route_key is None:
            connection.send(_error_frame("Forbidden", info.connection_id, request_id))
            return
        event = message_event(
            info, body=message, route_key=route_key, api_id=self.api_id, stage=self.api.stage
        )
        result = self._invoke(route_key, event)
        if result is None:
            return
        if not result.ok:
            connection.send(_error_frame("Internal server error", info.connection_id, request_id))
            return
        payload = result.payload
        if self.api.routes[route_key].two_way and isinstance(payload, dict) and payload.get("body"):
            body = payload["body"]
            connection.send(base64.b64decode(body) if payload.get("isBase64Encoded") else body)

    def _disconnected(self, info: ConnectionInfo, connection: ServerConnection) -> None:
        code = connection.close_code or NO_STATUS
        reason = connection.close_reason or (
            "Client-side close frame status not set" if code == NO_STATUS else ""
        )
        self._say(f"disconnected {info.connection_id} ({code})")
        event = disconnect_event(
            info, code=code, reason=reason, api_id=self.api_id, stage=self.api.stage
        )
        self._invoke("$disconnect", event)

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(f"[websocket] {message}")

    # --- the management API

    def _find(self, connection_id: str) -> _Open | None:
        with self._lock:
            return self._open.get(connection_id)

    def post(self, connection_id: str, data: bytes) -> tuple[int, dict[str, Any] | None]:
        if len(data) > MAX_MESSAGE_BYTES:
            return 413, {"message": f"Message too long ({len(data)} > {MAX_MESSAGE_BYTES})"}
        entry = self._find(connection_id)
        if entry is None:
            return 410, None
        try:
            text = data.decode()
        except UnicodeDecodeError:
            payload: str | bytes = data
        else:
            payload = text
        try:
            entry.connection.send(payload)
        except ConnectionClosed:
            return 410, None
        entry.info.last_active_at = datetime.now(UTC)
        return 200, None

    def describe(self, connection_id: str) -> tuple[int, dict[str, Any] | None]:
        entry = self._find(connection_id)
        if entry is None:
            return 410, None
        info = entry.info
        return 200, {
            "connectedAt": _iso(info.connected_at),
            "identity": {"sourceIp": info.source_ip, "userAgent": info.user_agent},
            "lastActiveAt": _iso(info.last_active_at),
        }

    def disconnect(self, connection_id: str) -> tuple[int, dict[str, Any] | None]:
        entry = self._find(connection_id)
        if entry is None:
            return 410, None
        entry.connection.close(1000, "")
        return 204, None

    def manage(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any] | None]:
        """One management API call: `{method} /{stage}/@connections/{id}`."""
        found = _MANAGEMENT_PATH.match(urlsplit(path).path)
        if found is None or found["stage"] != self.api.stage:
            return 403, {"message": "Forbidden"}
        connection_id = unquote(found["connection"])
        if self.iam is not None:
            headers = headers or {}
            resource = (
                f"arn:aws:execute-api:{self.region}:{ACCOUNT_ID}:{self.api_id}/"
                f"{self.api.stage}/{method}/@connections/{connection_id}"
            )
            host = {k.lower(): v for k, v in headers.items()}.get("host", "")
            refusal = self.iam.check(
                method=method,
                url=f"http://{host}{path}",
                headers=headers,
                body=body,
                action="execute-api:ManageConnections",
                resource=resource,
            )
            if refusal is not None:
                return refusal.status, {"message": refusal.message, "__type": refusal.error_type}
        if method == "POST":
            return self.post(connection_id, body)
        if method == "GET":
            return self.describe(connection_id)
        if method == "DELETE":
            return self.disconnect(connection_id)
        return 403, {"message": "Forbidden"}

    def _management_handler(self) -> type[BaseHTTPRequestHandler]:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "gpuqueue-local-websocket-management"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = dict(self.headers.items())
                self._answer(*gateway.manage(self.command, self.path, body, headers))

            def _answer(self, status: int, answer: dict[str, Any] | None) -> None:
                answer = dict(answer or {})
                error_type = answer.pop("__type", None)
                raw = b"" if status == 204 else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("x-amzn-requestid", str(uuid.uuid4()))
                error = error_type or {
                    403: "ForbiddenException",
                    410: "GoneException",
                }.get(status)
                if status == 413:
                    error = "PayloadTooLargeException"
                if error:
                    self.send_header("x-amzn-errortype", error)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _refuse(connection: ServerConnection, status: int, message: str) -> Response:
    response = connection.respond(status, json.dumps({"message": message}))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _error_frame(message: str, connection_id: str, request_id: str) -> str:
    return json.dumps({"message": message, "connectionId": connection_id, "requestId": request_id})


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
