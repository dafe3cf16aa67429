"""FleetAdmin: what operators do to the GPU fleet (list, add or change, drain, delete).

Rows created here carry source "admin". Rows declared by the stack parameters
(`ImageEndpointUrls`/`ImageEndpoints` and their speech twins; source "parameter") belong to
the stack: the checker re-creates them on every run, so only their state, capacity and
weight may change here, and they cannot be deleted (disable them, or remove them from the
parameter).

A credential reference given here must be under the stack's prefixes (`CredentialScope`):
the functions that call GPUs may read nothing else.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from gpuqueue.errors import EndpointConflict, EndpointNotFound, InvalidInput
from gpuqueue.fleet.endpoint_registry import ADMIN_SOURCE, PARAMETER_SOURCE, EndpointRegistry
from gpuqueue.fleet.endpoint_specs import (
    ENDPOINT_ID_PATTERN,
    MAX_CAPACITY,
    MAX_WEIGHT,
    ComfyWorkflowSpec,
    CredentialSpec,
    EndpointUrl,
    callback_problem,
    plain_workflow,
    protocol_problem,
    workflow_problem,
)
from gpuqueue.gpu.credentials import CredentialScope
from gpuqueue.models import (
    CredentialRef,
    Endpoint,
    EndpointProtocol,
    EndpointState,
    TaskKind,
)

# What a declared row keeps from the stack parameter; the rest is the operator's to change.
DECLARED_FIELDS = (
    "url",
    "kind",
    "protocol",
    "credentials",
    "workflow",
    "callback",
    "callback_progress",
)
DECLARING_PARAMETERS = "ImageEndpointUrls/ImageEndpoints (SpeechEndpointUrls/SpeechEndpoints)"


def check_endpoint_id(endpoint_id: str) -> str:
    if not re.fullmatch(ENDPOINT_ID_PATTERN, endpoint_id):
        raise InvalidInput(
            "endpoint_id: 1-64 characters of letters, digits, '.', '_' or '-'",
            field="endpoint_id",
        )
    return endpoint_id


class EndpointSpec(BaseModel):
    """The body of `PUT /api/v1/admin/endpoints/{id}`: an endpoint's whole configuration."""

    model_config = ConfigDict(extra="forbid")

    url: EndpointUrl
    kind: TaskKind
    protocol: EndpointProtocol = EndpointProtocol.OPENAI
    capacity: int = Field(default=1, ge=1, le=MAX_CAPACITY)
    weight: int = Field(default=1, ge=1, le=MAX_WEIGHT)
    state: EndpointState = EndpointState.ACTIVE
    # Where its API key or token is kept (a secret or SSM parameter under the stack's
    # prefix), never the value; None: calls carry no credentials.
    credentials: CredentialSpec | None = None
    # protocol comfyui: the workflow its tasks run (required there, refused elsewhere).
    workflow: ComfyWorkflowSpec | None = Field(default=None, validate_default=True)
    # Cog only: start predictions with a webhook, no Lambda waiting on them.
    callback: bool = False
    # Callback mode: Cog's `logs` webhooks too (progress, a prompt cancel); False: cheapest.
    callback_progress: bool = True

    @field_validator("protocol")
    @classmethod
    def _protocol_of_kind(cls, value: EndpointProtocol, info: ValidationInfo) -> EndpointProtocol:
        kind = info.data.get("kind")
        problem = protocol_problem(kind, value) if isinstance(kind, TaskKind) else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("workflow")
    @classmethod
    def _workflow_of_protocol(
        cls, value: ComfyWorkflowSpec | None, info: ValidationInfo
    ) -> ComfyWorkflowSpec | None:
        protocol = info.data.get("protocol")
        problem = workflow_problem(protocol, value) if protocol is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("callback", "callback_progress")
    @classmethod
    def _callback_on_cog(cls, value: bool, info: ValidationInfo) -> bool:
        protocol = info.data.get("protocol")
        callback, progress = (
            (value, True) if info.field_name == "callback" else (info.data.get("callback"), value)
        )
        problem = (
            callback_problem(protocol, bool(callback), progress=progress)
            if protocol is not None
            else None
        )
        if problem:
            raise ValueError(problem)
        return value


def _plain(credentials: CredentialRef | None) -> CredentialRef | None:
    """The reference as stored: a plain CredentialRef, not the strict body class."""
    return None if credentials is None else CredentialRef.model_validate(credentials.model_dump())


def _comparable(value: object) -> object:
    # pydantic compares models by class too: a CredentialSpec never equals a CredentialRef.
    return value.model_dump() if isinstance(value, BaseModel) else value


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
        credential_scope: CredentialScope | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._max_age = health_max_age_seconds
        self._scope = credential_scope or CredentialScope()
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
                if _comparable(getattr(spec, name)) != _comparable(getattr(current, name)):
                    raise EndpointConflict(
                        f"{name}: endpoint {endpoint_id} is declared by the stack parameter "
                        f"{DECLARING_PARAMETERS}; only state, capacity and weight change here",
                        field=name,
                    )
            source = PARAMETER_SOURCE
        elif spec.credentials is not None:
            problem = self._scope.problem(spec.credentials)
            if problem is not None:
                field, why = problem
                raise InvalidInput(f"credentials.{field}: {why}", field=f"credentials.{field}")
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
                credentials=_plain(spec.credentials),
                workflow=plain_workflow(spec.workflow),
                callback=spec.callback,
                callback_progress=spec.callback_progress,
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
                f"endpoint {endpoint_id} is declared by the stack parameter "
                f"{DECLARING_PARAMETERS} and would come back on the next health check: set its "
                "state to DISABLED, or remove it from the parameter",
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
