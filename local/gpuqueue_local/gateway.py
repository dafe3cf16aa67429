"""A local API Gateway HTTP API: the template's routes, its JWT authorizer, its limits.

Requests become payload-format 2.0 events; the Lambda's answer becomes the HTTP response,
as API Gateway does it. JWTs are checked like the JWT authorizer checks them: RS256
signature against the user pool's JWKS, issuer, expiry, audience (or `client_id` for
access tokens, which carry no `aud`) and the route's required scopes.
"""

from __future__ import annotations

import base64
import json
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

import jwt
import requests

from gpuqueue_local.lambda_runtime import FunctionRuntime, InvocationResult

MAX_BODY_BYTES = 10 * 1024 * 1024  # HTTP API payload quota (hard)
INTEGRATION_TIMEOUT_SECONDS = 30.0  # HTTP API's maximum integration timeout
_TEXT_TYPES = re.compile(
    r"^(text/|application/(json|xml|x-www-form-urlencoded|javascript|.*\+json|.*\+xml))"
)


@dataclass(frozen=True)
class JwtAuthorizer:
    issuer: str
    audience: tuple[str, ...]
    scopes: tuple[str, ...]
    jwks_url: str


@dataclass(frozen=True)
class Route:
    method: str  # "ANY" matches every method
    path: str  # "/api/v1/tasks/{task_id}", "{proxy+}" greedy, or "$default"
    function: str
    authorizer: JwtAuthorizer | None
    scopes: tuple[str, ...] = ()

    @property
    def route_key(self) -> str:
        return "$default" if self.path == "$default" else f"{self.method} {self.path}"

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.path == "$default":
            return {}
        if self.method not in ("ANY", method):
            return None
        pattern = "^"
        for part in re.split(r"(\{[^}]+\})", self.path):
            if part.startswith("{") and part.endswith("+}"):
                pattern += f"(?P<{part[1:-2]}>.+)"
            elif part.startswith("{"):
                pattern += f"(?P<{part[1:-1]}>[^/]+)"
            else:
                pattern += re.escape(part)
        found = re.match(pattern + "$", path)
        # Matching runs on the raw path; API Gateway hands the function decoded values.
        return {k: unquote(v) for k, v in found.groupdict().items()} if found else None


class Unauthorized(Exception):
    pass


@dataclass
class JwtVerifier:
    """Caches each pool's JWKS; verification needs no network after the first fetch."""

    _clients: dict[str, jwt.PyJWKClient] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, url: str) -> jwt.PyJWKClient:
        with self._lock:
            if url not in self._clients:
                # moto serves JWKS only to SigV4-looking requests; any such header will do.
                self._clients[url] = jwt.PyJWKClient(
                    url,
                    headers={
                        "Authorization": "AWS4-HMAC-SHA256 Credential=test/20260101/"
                        "us-east-1/cognito-idp/aws4_request, SignedHeaders=host, Signature=x"
                    },
                )
            return self._clients[url]

    def verify(
        self, authorization: str | None, authorizer: JwtAuthorizer, scopes: tuple[str, ...]
    ) -> dict[str, Any]:
        if not authorization:
            raise Unauthorized("missing token")
        token = authorization.removeprefix("Bearer ").strip()
        try:
            key = self._client(authorizer.jwks_url).get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                issuer=authorizer.issuer,
                options={"require": ["exp", "iss"], "verify_aud": False},
                leeway=0,
            )
        except (jwt.PyJWTError, jwt.PyJWKClientError) as error:
            raise Unauthorized(str(error)) from error
        audience = claims.get("aud") or claims.get("client_id")
        audiences = audience if isinstance(audience, list) else [audience]
        if not set(audiences) & set(authorizer.audience):
            raise Unauthorized("audience not allowed")
        required = set(scopes or authorizer.scopes)
        if required and not required & set(str(claims.get("scope", "")).split()):
            raise Unauthorized("required scope missing")
        return claims


def _claims_for_event(claims: Mapping[str, Any]) -> dict[str, str]:
    """API Gateway hands claims over as strings; arrays become "[a b]"."""
    flattened = {}
    for name, value in claims.items():
        if isinstance(value, list):
            flattened[name] = "[" + " ".join(str(v) for v in value) + "]"
        else:
            flattened[name] = str(value)
    return flattened


class _GatewayServer(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a burst of clients connecting at once (21
    # concurrent submits, measured) got connections reset, which API Gateway never does.
    request_queue_size = 128
    daemon_threads = True


@dataclass
class ApiGateway:
    routes: list[Route]
    functions: Mapping[str, FunctionRuntime]
    verifier: JwtVerifier = field(default_factory=JwtVerifier)
    api_id: str = "local"
    ready: Callable[[], bool] = lambda: True
    integration_timeout_seconds: float = INTEGRATION_TIMEOUT_SECONDS
    request_log: Callable[[str], None] | None = None

    def find_route(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        # API Gateway prefers the most specific route: literal paths, then parameters, then
        # greedy paths, then $default.
        def rank(route: Route) -> tuple[int, int, int]:
            any_method = 1 if route.method == "ANY" else 0  # GET /x beats ANY /x
            if route.path == "$default":
                return (3, 0, any_method)
            if "+}" in route.path:
                return (2, -len(route.path), any_method)
            return (1 if "{" in route.path else 0, -len(route.path), any_method)

        for route in sorted(self.routes, key=rank):
            params = route.match(method, path)
            if params is not None:
                return route, params
        return None

    def handle(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes, source_ip: str
    ) -> tuple[int, dict[str, str], bytes]:
        split = urlsplit(raw_path)
        path = split.path
        if method == "GET" and path == "/health":
            ok = self.ready()
            return _json(200 if ok else 503, {"status": "ok" if ok else "starting"})
        if len(body) > MAX_BODY_BYTES:
            return _json(413, {"message": "Request Entity Too Large"})
        found = self.find_route(method, path)
        if found is None:
            return _json(404, {"message": "Not Found"})
        route, path_params = found
        lowered = {k.lower(): v for k, v in headers.items()}
        claims: dict[str, Any] | None = None
        if route.authorizer is not None:
            try:
                claims = self.verifier.verify(
                    lowered.get("authorization"), route.authorizer, route.scopes
                )
            except Unauthorized:
                return _json(
                    401,
                    {"message": "Unauthorized"},
                    {"www-authenticate": 'Bearer error="invalid_token"'},
                )
        event = self._event(
            route=route,
            method=method,
            path=split.path,
            query=split.query,
            headers=lowered,
            body=body,
            path_params=path_params,
            claims=claims,
            source_ip=source_ip,
        )
        runtime = self.functions[route.function]
        timeout = min(self.integration_timeout_seconds, runtime.spec.timeout_seconds)
        result = runtime.invoke(event, timeout_seconds=timeout)
        return _response(result)

    def _event(
        self,
        *,
        route: Route,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        path_params: dict[str, str],
        claims: dict[str, Any] | None,
        source_ip: str,
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        params: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            params[name] = f"{params[name]},{value}" if name in params else value
        content_type = headers.get("content-type", "")
        binary = bool(body) and not _TEXT_TYPES.match(content_type.lower())
        event: dict[str, Any] = {
            "version": "2.0",
            "routeKey": route.route_key,
            "rawPath": path,
            "rawQueryString": query,
            "headers": dict(headers),
            "requestContext": {
                "accountId": "123456789012",
                "apiId": self.api_id,
                "domainName": headers.get("host", "127.0.0.1"),
                "domainPrefix": self.api_id,
                "http": {
                    "method": method,
                    "path": path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": source_ip,
                    "userAgent": headers.get("user-agent", ""),
                },
                "requestId": base64.urlsafe_b64encode(uuid.uuid4().bytes[:10]).decode().rstrip("="),
                "routeKey": route.route_key,
                "stage": "$default",
                "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "timeEpoch": int(now.timestamp() * 1000),
            },
            "isBase64Encoded": binary,
        }
        if "cookie" in headers:
            event["cookies"] = [c.strip() for c in headers["cookie"].split(";") if c.strip()]
        if params:
            event["queryStringParameters"] = params
        if path_params:
            event["pathParameters"] = path_params
        if body:
            event["body"] = (
                base64.b64encode(body).decode() if binary else body.decode("utf-8", "replace")
            )
        if claims is not None:
            event["requestContext"]["authorizer"] = {
                "jwt": {
                    "claims": _claims_for_event(claims),
                    "scopes": str(claims.get("scope", "")).split() or None,
                }
            }
        return event

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "gpuqueue-local-gateway"

            def _handle(self) -> None:
                started = time.monotonic()
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_BODY_BYTES:
                    status, headers, body = _json(413, {"message": "Request Entity Too Large"})
                    self.close_connection = True
                else:
                    raw = self.rfile.read(length) if length else b""
                    try:
                        status, headers, body = gateway.handle(
                            self.command,
                            self.path,
                            dict(self.headers.items()),
                            raw,
                            self.client_address[0],
                        )
                    except Exception:
                        status, headers, body = _json(500, {"message": "Internal Server Error"})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.send_header("apigw-requestid", uuid.uuid4().hex[:16])
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                if gateway.request_log is not None:
                    elapsed = (time.monotonic() - started) * 1000
                    gateway.request_log(
                        f"{self.command} {self.path} -> {status} ({elapsed:.0f} ms)"
                    )

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

            def __getattr__(self, name: str) -> Any:
                # Any other method (TRACE, QUERY, ...) finds no route, as on API Gateway
                # (404), rather than http.server's 501 page.
                if name.startswith("do_"):
                    return self._handle
                raise AttributeError(name)

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = _GatewayServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True, name="gateway").start()
        return server


def _json(
    status: int, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return (
        status,
        {"content-type": "application/json", **(headers or {})},
        json.dumps(body).encode(),
    )


def _response(result: InvocationResult) -> tuple[int, dict[str, str], bytes]:
    """Payload format 2.0 response mapping, and API Gateway's own errors."""
    if result.timed_out:
        return _json(503, {"message": "Service Unavailable"})
    if not result.ok:
        return _json(500, {"message": "Internal Server Error"})
    payload = result.payload
    if not isinstance(payload, dict) or "statusCode" not in payload:
        # A bare value: API Gateway answers 200 with it as JSON.
        return _json(200, payload)
    headers = {str(k).lower(): str(v) for k, v in (payload.get("headers") or {}).items()}
    body = payload.get("body") or ""
    raw = base64.b64decode(body) if payload.get("isBase64Encoded") else str(body).encode()
    cookies = payload.get("cookies") or []
    if cookies:
        headers["set-cookie"] = cookies[0]  # one is enough for this API; it sets none
    try:
        status = int(payload["statusCode"])
    except (TypeError, ValueError):
        return _json(500, {"message": "Internal Server Error"})
    if status not in {s.value for s in HTTPStatus}:
        return _json(500, {"message": "Internal Server Error"})
    headers.setdefault("content-type", "application/json")
    return status, headers, raw


def jwks_url(moto_url: str, user_pool_id: str) -> str:
    return f"{moto_url.rstrip('/')}/{user_pool_id}/.well-known/jwks.json"


def fetch_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False
