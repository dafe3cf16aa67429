"""FleetAdmin: what operators do to the GPU fleet (list, add or change, drain, delete).

Rows created here carry source "admin". Rows declared by the `ImageEndpointUrls` stack
parameter (source "parameter") belong to the stack: the checker re-creates them on every
run, so only their state, capacity and weight may change here, and they cannot be deleted
(disable them, or remove them from the parameter).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from gpuqueue.endpoint_registry import ADMIN_SOURCE, PARAMETER_SOURCE, EndpointRegistry
from gpuqueue.errors import EndpointConflict, EndpointNotFound, InvalidInput
from gpuqueue.models import Endpoint, EndpointProtocol, EndpointState, TaskKind

ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MAX_URL_LENGTH = 2048
MAX_CAPACITY = 64
MAX_WEIGHT = 100
# What a declared row keeps from the stack parameter; the rest is the operator's to change.
DECLARED_FIELDS = ("url", "kind", "protocol")


def check_endpoint_id(endpoint_id: str) -> str:
    if not re.fullmatch(ENDPOINT_ID_PATTERN, endpoint_id):
        raise InvalidInput(
            "endpoint_id: 1-64 characters of letters, digits, '.', '_' or '-'",
            field="endpoint_id",
        )
    return endpoint_id


def _base_url(value: str) -> str:
    """An http(s) base URL without credentials, query or fragment; no trailing slash."""
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("must not contain whitespace or control characters")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("must name a host")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError("must be a base URL, without a query or fragment")
    return value.rstrip("/")


class EndpointSpec(BaseModel):
    """The body of `PUT /api/v1/admin/endpoints/{id}`: an endpoint's whole configuration."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_URL_LENGTH)
    ]
    kind: TaskKind
    protocol: EndpointProtocol = EndpointProtocol.OPENAI
    capacity: int = Field(default=1, ge=1, le=MAX_CAPACITY)
    weight: int = Field(default=1, ge=1, le=MAX_WEIGHT)
    state: EndpointState = EndpointState.ACTIVE

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _base_url(value)

    @field_validator("protocol")
    @classmethod
    def _protocol_of_kind(cls, value: EndpointProtocol, info: ValidationInfo) -> EndpointProtocol:
        # Speech endpoints speak one protocol: OpenAI-compatible /v1/audio/transcriptions.
        if info.data.get("kind") is TaskKind.SPEECH and value is not EndpointProtocol.OPENAI:
            raise ValueError("speech endpoints speak the openai protocol only")
        return value


class EndpointView(Endpoint):
    """An endpoint as operators see it: configuration, health, live load, routability."""

    in_flight: int
    routable: bool

    @classmethod
    def of(cls, endpoint: Endpoint, *, in_flight: int, routable: bool) -> EndpointView:
        fields: dict[str, Any] = endpoint.model_dump()
        return cls(**fields, in_flight=in_flight, routable=routable)


class FleetAdmin:
    def __init__(
        self,
        registry: EndpointRegistry,
        *,
        health_max_age_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._max_age = health_max_age_seconds
        self._clock = clock

    def list(self, kind: TaskKind | None = None) -> list[EndpointView]:
        """Every endpoint of `kind` (of every kind when None), by kind then id."""
        now = self._clock()
        views = []
        for each in [kind] if kind is not None else list(TaskKind):
            fleet = self._registry.fleet(each)
            views += [
                EndpointView.of(
                    endpoint,
                    in_flight=fleet.in_flight(endpoint.endpoint_id, now),
                    routable=endpoint.is_routable(now, self._max_age),
                )
                for endpoint in fleet.endpoints
            ]
        return views

    def upsert(self, endpoint_id: str, spec: EndpointSpec) -> EndpointView:
        """Add an endpoint (source "admin") or replace its configuration; health is kept."""
        check_endpoint_id(endpoint_id)
        current = self._registry.get(endpoint_id)
        source = ADMIN_SOURCE
        if current is not None and current.source == PARAMETER_SOURCE:
            for name in DECLARED_FIELDS:
                if getattr(spec, name) != getattr(current, name):
                    raise EndpointConflict(
                        f"{name}: endpoint {endpoint_id} is declared by the stack parameter "
                        "ImageEndpointUrls; only state, capacity and weight change here",
                        field=name,
                    )
            source = PARAMETER_SOURCE
        saved = self._registry.put(
            Endpoint(
                endpoint_id=endpoint_id,
                url=spec.url,
                kind=spec.kind,
                protocol=spec.protocol,
                capacity=spec.capacity,
                weight=spec.weight,
                state=spec.state,
                source=source,
            )
        )
        return self._view(saved)

    def drain(self, endpoint_id: str) -> EndpointView:
        """No new work for this endpoint; calls already running finish."""
        check_endpoint_id(endpoint_id)
        drained = self._registry.set_state(endpoint_id, EndpointState.DRAINING)
        if drained is None:
            raise EndpointNotFound(f"endpoint {endpoint_id} not found", field="endpoint_id")
        return self._view(drained)

    def delete(self, endpoint_id: str) -> None:
        """Remove an admin-added endpoint; calls already running finish on their leases."""
        check_endpoint_id(endpoint_id)
        current = self._registry.get(endpoint_id)
        if current is None:
            raise EndpointNotFound(f"endpoint {endpoint_id} not found", field="endpoint_id")
        if current.source == PARAMETER_SOURCE:
            raise EndpointConflict(
                f"endpoint {endpoint_id} is declared by the stack parameter ImageEndpointUrls "
                "and would come back on the next health check: set its state to DISABLED, "
                "or remove it from the parameter",
                field="endpoint_id",
            )
        if not self._registry.delete(endpoint_id):
            raise EndpointNotFound(f"endpoint {endpoint_id} not found", field="endpoint_id")

    def _view(self, endpoint: Endpoint) -> EndpointView:
        now = self._clock()
        in_flight = self._registry.fleet(endpoint.kind).in_flight(endpoint.endpoint_id, now)
        return EndpointView.of(
            endpoint, in_flight=in_flight, routable=endpoint.is_routable(now, self._max_age)
        )
