"""The GPU endpoints a deploy declares, read from the stack parameters the checker gets.

Per kind, two parameters, which may be used together:

- `ImageEndpointUrls` / `SpeechEndpointUrls`: comma-separated base URLs, as before. Each is
  protocol `openai`, capacity 1 (until an operator sets it), no credentials, and has the id
  `<kind>-<hash of the URL>`.
- `ImageEndpoints` / `SpeechEndpoints`: a JSON list of objects
  `{"id"?, "url", "protocol"?, "capacity"?, "weight"?, "credentials"?, "workflow"?}`, where
  `credentials` names a secret or SSM parameter holding the key (`models.CredentialRef`)
  and `workflow` is a comfyui endpoint's graph and node ids (`endpoint_specs.ComfyWorkflowSpec`).

Every entry is validated on its own (pydantic, the same rules as the admin API): a bad one
is reported with its parameter, position (from 0), id, field and reason, and skipped; the
good ones are declared. Reports never quote the value given, in case a key was pasted in
by mistake.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gpuqueue.fleet.endpoint_specs import (
    MAX_CAPACITY,
    MAX_WEIGHT,
    ComfyWorkflowSpec,
    CredentialSpec,
    EndpointId,
    EndpointUrl,
    callback_problem,
    endpoint_id_for,
    plain_workflow,
    protocol_problem,
    workflow_problem,
)
from gpuqueue.gpu.credentials import CredentialScope
from gpuqueue.models import ComfyWorkflow, CredentialRef, EndpointProtocol, TaskKind

# The stack parameters, per kind: (the URL list, the JSON list).
PARAMETERS: Mapping[TaskKind, tuple[str, str]] = {
    TaskKind.IMAGE: ("ImageEndpointUrls", "ImageEndpoints"),
    TaskKind.SPEECH: ("SpeechEndpointUrls", "SpeechEndpoints"),
}
_URL = TypeAdapter(EndpointUrl)


class EndpointEntry(BaseModel):
    """One entry of `ImageEndpoints` / `SpeechEndpoints`."""

    model_config = ConfigDict(extra="forbid")

    id: EndpointId | None = None  # default: <kind>-<hash of the URL>, as for the URL list
    url: EndpointUrl
    protocol: EndpointProtocol = EndpointProtocol.OPENAI
    capacity: int | None = Field(default=None, ge=1, le=MAX_CAPACITY)
    weight: int | None = Field(default=None, ge=1, le=MAX_WEIGHT)
    credentials: CredentialSpec | None = None
    workflow: ComfyWorkflowSpec | None = None
    callback: bool = False  # cog only: predictions reported by webhook
    callback_progress: bool = True  # callback mode: Cog's `logs` webhooks too


@dataclass(frozen=True)
class DeclaredEndpoint:
    """An endpoint as a parameter declares it. `capacity`/`weight` None: not declared (a
    new row starts at 1; an existing row keeps its figure)."""

    endpoint_id: str
    url: str
    protocol: EndpointProtocol = EndpointProtocol.OPENAI
    capacity: int | None = None
    weight: int | None = None
    credentials: CredentialRef | None = None
    workflow: ComfyWorkflow | None = None
    callback: bool = False
    callback_progress: bool = True


@dataclass(frozen=True)
class DeclarationError:
    """Why one entry (or a whole parameter, `entry` None) was refused."""

    parameter: str
    message: str
    entry: int | None = None
    endpoint_id: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.parameter if self.entry is None else f"{self.parameter}[{self.entry}]"
        if self.endpoint_id:
            where += f" ({self.endpoint_id})"
        return f"{where}{'.' + self.field if self.field else ''}: {self.message}"


@dataclass
class Declaration:
    """One kind's declared endpoints, and what was refused."""

    endpoints: list[DeclaredEndpoint] = field(default_factory=list)
    errors: list[DeclarationError] = field(default_factory=list)


def read_declarations(
    urls: Mapping[TaskKind, Sequence[str]],
    entries: Mapping[TaskKind, str],
    scope: CredentialScope,
) -> dict[TaskKind, Declaration]:
    """Every kind's declaration from its URL list and its JSON list (either may be empty)."""
    reader = _Reader(scope)
    result = {}
    for kind in TaskKind:
        url_parameter, json_parameter = PARAMETERS[kind]
        declaration = Declaration()
        for index, url in enumerate(urls.get(kind, ())):
            reader.url(declaration, kind, _Place(url_parameter, index), url)
        raw = entries.get(kind, "").strip()
        if raw:
            reader.json_list(declaration, kind, json_parameter, raw)
        result[kind] = declaration
    return result


@dataclass(frozen=True)
class _Place:
    """Where an entry was written: its parameter and position."""

    parameter: str
    index: int

    def __str__(self) -> str:
        return f"{self.parameter}[{self.index}]"


class _Reader:
    """Reads entries into declarations; remembers the ids (across kinds: one table holds
    them all) and URLs (per kind) declared so far, so a repeat is refused."""

    def __init__(self, scope: CredentialScope) -> None:
        self._scope = scope
        self._ids: dict[str, _Place] = {}
        self._urls: dict[tuple[TaskKind, str], _Place] = {}

    def url(self, declaration: Declaration, kind: TaskKind, place: _Place, url: str) -> None:
        try:
            clean = _URL.validate_python(url)
        except ValidationError as error:
            message = error.errors(include_input=False)[0]["msg"]
            declaration.errors.append(DeclarationError(place.parameter, message, place.index))
            return
        endpoint = DeclaredEndpoint(endpoint_id=endpoint_id_for(kind, clean), url=clean)
        self._add(declaration, kind, place, endpoint)

    def json_list(self, declaration: Declaration, kind: TaskKind, parameter: str, raw: str) -> None:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as error:
            # The decoder's message names the position only, never the text around it.
            declaration.errors.append(DeclarationError(parameter, f"not valid JSON: {error.msg}"))
            return
        if not isinstance(parsed, list):
            declaration.errors.append(
                DeclarationError(parameter, "must be a JSON list of endpoint objects")
            )
            return
        for index, item in enumerate(parsed):
            place = _Place(parameter, index)
            endpoint = self._entry(declaration, kind, place, item)
            if endpoint is not None:
                self._add(declaration, kind, place, endpoint)

    def _entry(
        self, declaration: Declaration, kind: TaskKind, place: _Place, item: Any
    ) -> DeclaredEndpoint | None:
        named = item.get("id") if isinstance(item, dict) else None
        shown_id = named if isinstance(named, str) else None

        def refuse(message: str, field_name: str | None) -> None:
            declaration.errors.append(
                DeclarationError(
                    place.parameter, message, place.index, endpoint_id=shown_id, field=field_name
                )
            )

        try:
            entry = EndpointEntry.model_validate(item)
        except ValidationError as error:
            for detail in error.errors(include_input=False, include_url=False):
                location = ".".join(str(part) for part in detail["loc"])
                refuse(detail["msg"], location or None)
            return None
        wrong_protocol = protocol_problem(kind, entry.protocol)
        if wrong_protocol:
            refuse(wrong_protocol, "protocol")
            return None
        wrong_workflow = workflow_problem(entry.protocol, entry.workflow)
        if wrong_workflow:
            refuse(wrong_workflow, "workflow")
            return None
        wrong_callback = callback_problem(
            entry.protocol, entry.callback, progress=entry.callback_progress
        )
        if wrong_callback:
            refuse(wrong_callback, "callback")
            return None
        credentials = None
        if entry.credentials is not None:
            outside = self._scope.problem(entry.credentials)
            if outside:
                refuse(outside[1], f"credentials.{outside[0]}")
                return None
            credentials = CredentialRef.model_validate(entry.credentials.model_dump())
        return DeclaredEndpoint(
            endpoint_id=entry.id or endpoint_id_for(kind, entry.url),
            url=entry.url,
            protocol=entry.protocol,
            capacity=entry.capacity,
            weight=entry.weight,
            credentials=credentials,
            workflow=plain_workflow(entry.workflow),
            callback=entry.callback,
            callback_progress=entry.callback_progress,
        )

    def _add(
        self, declaration: Declaration, kind: TaskKind, place: _Place, endpoint: DeclaredEndpoint
    ) -> None:
        """Declare it unless its id or URL already is (the first declaration wins)."""
        first_id = self._ids.get(endpoint.endpoint_id)
        first_url = self._urls.get((kind, endpoint.url))
        if first_id is not None or first_url is not None:
            field_name, message = (
                ("id", f"{endpoint.endpoint_id} is already declared by {first_id}")
                if first_id is not None
                else ("url", f"already declared by {first_url} (one entry per server)")
            )
            declaration.errors.append(
                DeclarationError(
                    place.parameter,
                    message,
                    place.index,
                    endpoint_id=endpoint.endpoint_id,
                    field=field_name,
                )
            )
            return
        self._ids[endpoint.endpoint_id] = place
        self._urls[(kind, endpoint.url)] = place
        declaration.endpoints.append(endpoint)
