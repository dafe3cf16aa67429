"""Operators' GPU fleet API: list, add or change, drain, delete endpoints. Group `admin` only.

The caller's group is checked before anything else, so anyone else gets 403 whatever they
send; bodies and query strings are validated after it, into the same 400 answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from http import HTTPStatus
from typing import Any, TypeVar

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, TypeAdapter, ValidationError

from gpuqueue import aws_clients
from gpuqueue.admin_settings import AdminSettings
from gpuqueue.api.request_body import body_bytes
from gpuqueue.api.resolver import build_resolver, current_caller
from gpuqueue.errors import Forbidden
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.fleet_admin import EndpointSpec, EndpointView, FleetAdmin
from gpuqueue.gpu.credentials import CredentialScope
from gpuqueue.models import TaskKind
from gpuqueue.observability import Observability

observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
logger = observed.logger
app = build_resolver()

ADMIN_GROUP = "admin"
M = TypeVar("M", bound=BaseModel)
_VIEWS = TypeAdapter(list[EndpointView])
_KIND: TypeAdapter[TaskKind | None] = TypeAdapter(TaskKind | None)


@dataclass(frozen=True)
class Deps:
    fleet: FleetAdmin


@cache
def deps() -> Deps:
    settings = AdminSettings()
    registry = EndpointRegistry(aws_clients.dynamodb().Table(settings.endpoints_table))
    scope = CredentialScope(
        secret_prefix=settings.gpu_secret_prefix, parameter_prefix=settings.gpu_parameter_prefix
    )
    return Deps(
        fleet=FleetAdmin(
            registry,
            health_max_age_seconds=settings.health_max_age_seconds,
            credential_scope=scope,
        )
    )


def _admin_only() -> str:
    caller = current_caller(app)
    if ADMIN_GROUP not in caller.groups:
        raise Forbidden(f"operators only: this route needs the Cognito group {ADMIN_GROUP!r}")
    return caller.username


def _invalid(exc: ValidationError, *where: str) -> RequestValidationError:
    """The shared 400 mapping names the field: prefix pydantic's location with where it was."""
    return RequestValidationError([{**e, "loc": (*where, *e["loc"])} for e in exc.errors()])


def _body(model: type[M]) -> M:
    try:
        return model.model_validate_json(body_bytes(app.current_event))
    except ValidationError as exc:
        raise _invalid(exc, "body") from None


def _json(body: bytes | str) -> Response[str]:
    text = body.decode() if isinstance(body, bytes) else body
    return Response(HTTPStatus.OK.value, content_types.APPLICATION_JSON, text)


@app.get("/api/v1/admin/endpoints")
def list_endpoints() -> Response[str]:
    _admin_only()
    try:
        kind = _KIND.validate_python(app.current_event.get_query_string_value("kind"))
    except ValidationError as exc:
        raise _invalid(exc, "query", "kind") from None
    return _json(_VIEWS.dump_json(deps().fleet.list(kind)))


@app.put("/api/v1/admin/endpoints/<endpoint_id>")
def put_endpoint(endpoint_id: str) -> Response[str]:
    operator = _admin_only()
    view = deps().fleet.upsert(endpoint_id, _body(EndpointSpec))
    logger.info("endpoint put", extra={"endpoint_id": endpoint_id, "operator": operator})
    return _json(view.model_dump_json())


@app.post("/api/v1/admin/endpoints/<endpoint_id>/drain")
def drain_endpoint(endpoint_id: str) -> Response[str]:
    operator = _admin_only()
    view = deps().fleet.drain(endpoint_id)
    logger.info("endpoint draining", extra={"endpoint_id": endpoint_id, "operator": operator})
    return _json(view.model_dump_json())


@app.delete("/api/v1/admin/endpoints/<endpoint_id>")
def delete_endpoint(endpoint_id: str) -> Response[str]:
    operator = _admin_only()
    deps().fleet.delete(endpoint_id)
    logger.info("endpoint deleted", extra={"endpoint_id": endpoint_id, "operator": operator})
    return _json(json.dumps({"endpoint_id": endpoint_id, "deleted": True}))


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
