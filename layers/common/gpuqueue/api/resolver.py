"""HTTP glue shared by the API functions: the resolver, the caller, one error mapping.

Every error leaves as JSON `{"error": message, "code": CODE, "field"?: name}`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.middlewares.openapi_validation import (
    OpenAPIRequestValidationMiddleware,
)
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEventV2
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import errors
from gpuqueue.api.request_body import json_body
from gpuqueue.models import ErrorBody

logger = Logger(child=True)

# Submit and status answers name the WebSocket API clients may wait on instead of polling.
PUSH_URL_HEADER = "X-Push-Url"

STATUS_BY_ERROR: dict[type[errors.GpuqueueError], HTTPStatus] = {
    errors.InvalidInput: HTTPStatus.BAD_REQUEST,
    errors.InvalidJson: HTTPStatus.BAD_REQUEST,
    errors.WeakPassword: HTTPStatus.BAD_REQUEST,
    errors.InvalidCredentials: HTTPStatus.UNAUTHORIZED,
    errors.AccountNotConfirmed: HTTPStatus.FORBIDDEN,
    errors.InvalidConfirmationCode: HTTPStatus.BAD_REQUEST,
    errors.Unauthenticated: HTTPStatus.UNAUTHORIZED,
    errors.Forbidden: HTTPStatus.FORBIDDEN,
    errors.TaskNotFound: HTTPStatus.NOT_FOUND,
    errors.EndpointNotFound: HTTPStatus.NOT_FOUND,
    errors.TaskStateConflict: HTTPStatus.CONFLICT,
    errors.ResultExpired: HTTPStatus.GONE,
    errors.EndpointConflict: HTTPStatus.CONFLICT,
    errors.UserAlreadyExists: HTTPStatus.CONFLICT,
    errors.QueueFull: HTTPStatus.SERVICE_UNAVAILABLE,
    errors.ServiceUnavailable: HTTPStatus.SERVICE_UNAVAILABLE,
    errors.UnsupportedMediaType: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    errors.PayloadTooLarge: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    errors.UnprocessableAudio: HTTPStatus.UNPROCESSABLE_ENTITY,
    errors.UpstreamFailed: HTTPStatus.BAD_GATEWAY,
    errors.UpstreamTimeout: HTTPStatus.GATEWAY_TIMEOUT,
    errors.RateLimited: HTTPStatus.TOO_MANY_REQUESTS,
    errors.ActiveTaskLimit: HTTPStatus.TOO_MANY_REQUESTS,
    errors.NewAccountLimit: HTTPStatus.TOO_MANY_REQUESTS,
    errors.IdempotencyConflict: HTTPStatus.UNPROCESSABLE_ENTITY,
}


def error_response(
    status: HTTPStatus,
    message: str,
    code: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[str]:
    body = ErrorBody(error=message, code=code, field=field)
    return Response(
        status_code=status.value,
        content_type=content_types.APPLICATION_JSON,
        body=body.model_dump_json(exclude_none=True),
        headers=headers,
    )


def documented(
    status: HTTPStatus, description: str, model: Any = None
) -> dict[int, OpenAPIResponse]:
    """A success answer for a route's `responses=`: handlers that build their JSON body in a
    `Response` would otherwise be documented as a JSON string with status 200."""
    response: OpenAPIResponse = {"description": description}
    if model is not None:
        response["content"] = {content_types.APPLICATION_JSON: {"model": model}}
    return {status.value: response}


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "prompt") -> "prompt"; ("query", "limit") -> "limit"; ("body",) -> "body"
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or str(loc[0] if loc else "body")


class _JsonBodyValidation(OpenAPIRequestValidationMiddleware):
    """Powertools' request validation, reading a model body as JSON only.

    Powertools also parses form and multipart bodies into the model, and a multipart
    content type without a boundary raises a bare ValueError (a 500). Every route with a
    body model here takes JSON: anything else is a 415 naming the header.
    """

    def _get_body(self, app: Any) -> dict[str, Any]:
        content_type = app.current_event.headers.get("content-type", "").strip().lower()
        if content_type and not content_type.startswith("application/json"):
            raise RequestUnsupportedContentType(
                "Unsupported content type",
                errors=[{"type": "unsupported_content_type", "loc": ("body",)}],
            )
        body: dict[str, Any] = super()._get_body(app)
        return body

    def _parse_json_data(self, app: Any) -> Any:
        # Not json.loads: oversize integers, deep nesting and bad UTF-8 raised past its
        # handler (500s); this refuses every unparsable body as INVALID_JSON.
        return json_body(app.current_event)


class _RequestState(threading.local):
    """The request a thread is serving: what Powertools keeps on the resolver (the event and
    Lambda context on its class, the route context and middleware frames on the instance)."""

    def __init__(self) -> None:
        self.event: APIGatewayProxyEventV2 | None = None
        self.lambda_context: LambdaContext | None = None
        self.context: dict[str, Any] = {}
        self.processed_stack_frames: list[str] = []


class _ApiResolver(APIGatewayHttpResolver):
    """The resolver, with headers every answer carries (errors and 404s included, which
    Powertools' middlewares never see), and its request state kept per thread.

    Lambda serves one request per container at a time; threads calling one handler module
    in one process (the integration tests) would otherwise read each other's caller, or
    lose the route another request's end cleared (KeyError '_route').
    """

    def __init__(self, **options: Any) -> None:
        self._request = _RequestState()  # before Powertools' __init__ sets context
        super().__init__(**options)

    # The HTTP API's event type, as APIGatewayHttpResolver declares it (BaseRouter's is wider).
    @property  # type: ignore[override]
    def current_event(self) -> APIGatewayProxyEventV2:
        event = self._request.event
        if event is None:
            raise RuntimeError("no request is being resolved on this thread")
        return event

    @current_event.setter
    def current_event(self, event: APIGatewayProxyEventV2) -> None:
        self._request.event = event

    @property
    def lambda_context(self) -> LambdaContext:
        context = self._request.lambda_context
        if context is None:
            raise RuntimeError("no request is being resolved on this thread")
        return context

    @lambda_context.setter
    def lambda_context(self, context: LambdaContext) -> None:
        self._request.lambda_context = context

    @property
    def context(self) -> dict[str, Any]:
        return self._request.context

    @context.setter
    def context(self, value: dict[str, Any]) -> None:
        self._request.context = value

    @property
    def processed_stack_frames(self) -> list[str]:
        return self._request.processed_stack_frames

    @processed_stack_frames.setter
    def processed_stack_frames(self, value: list[str]) -> None:
        self._request.processed_stack_frames = value

    def resolve(self, event: Mapping[str, Any], context: LambdaContext) -> dict[str, Any]:
        # Powertools sets the event on its BaseRouter class (every resolver's, every
        # thread's): this thread's own copy is what the routes and middlewares read.
        self.current_event = cast(APIGatewayProxyEventV2, self._to_proxy_event(dict(event)))
        self.lambda_context = context
        answer = super().resolve(event, context)
        # Every body is JSON or says its type: a browser must not guess another (HTML).
        answer["headers"] = {**(answer.get("headers") or {}), "X-Content-Type-Options": "nosniff"}
        return answer


def build_resolver() -> APIGatewayHttpResolver:
    app = _ApiResolver(enable_validation=True)
    # The resolver made Powertools' own in __init__; every route reads it from here.
    app._request_validation_middleware = _JsonBodyValidation()  # type: ignore[no-untyped-call]

    @app.exception_handler(RequestValidationError)  # type: ignore[untyped-decorator]
    def _invalid(exc: RequestValidationError) -> Response[str]:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = _field_name(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(
                HTTPStatus.BAD_REQUEST,
                "request body is not valid JSON",
                "INVALID_JSON",
                field="body",
            )
        message = f"{field}: {first.get('msg', 'invalid value')}"
        return error_response(HTTPStatus.BAD_REQUEST, message, "VALIDATION_ERROR", field=field)

    @app.exception_handler(RequestUnsupportedContentType)  # type: ignore[untyped-decorator]
    def _unsupported(exc: RequestUnsupportedContentType) -> Response[str]:
        return error_response(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "content-type: send the body as application/json",
            "UNSUPPORTED_CONTENT_TYPE",
            field="content-type",
        )

    @app.exception_handler(errors.GpuqueueError)  # type: ignore[untyped-decorator]
    def _domain(exc: errors.GpuqueueError) -> Response[str]:
        status = STATUS_BY_ERROR.get(type(exc), HTTPStatus.BAD_REQUEST)
        headers = None
        if isinstance(exc, errors.QueueFull | errors.ServiceUnavailable):
            headers = {"Retry-After": str(exc.retry_after_seconds)}
        if isinstance(exc, errors.RateLimited):
            headers = {**exc.headers, "Retry-After": str(exc.retry_after_seconds)}
        return error_response(status, exc.message, exc.code, field=exc.field, headers=headers)

    @app.not_found
    def _no_route(exc: NotFoundError) -> Response[str]:
        return error_response(HTTPStatus.NOT_FOUND, "no such route", "NOT_FOUND")

    return app


@dataclass(frozen=True)
class Caller:
    """The authenticated user, from the JWT claims API Gateway's authorizer verified."""

    sub: str
    username: str
    groups: frozenset[str]


def current_caller(app: APIGatewayHttpResolver) -> Caller:
    claims = app.current_event.request_context.authorizer.jwt_claim or {}
    sub = claims.get("sub")
    if not sub:
        # Only reachable if a route lost its authorizer: fail closed.
        raise errors.Unauthenticated("missing or invalid token")
    raw_groups = claims.get("cognito:groups") or ""
    if isinstance(raw_groups, str):
        # API Gateway flattens array claims to "[a b]".
        groups = frozenset(raw_groups.strip("[]").replace(",", " ").split())
    else:
        groups = frozenset(str(g) for g in raw_groups)
    return Caller(sub=str(sub), username=str(claims.get("username", "")), groups=groups)
