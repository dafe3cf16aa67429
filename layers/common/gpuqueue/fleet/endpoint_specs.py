"""What a valid endpoint configuration is, wherever it comes from: the admin API's body
(`fleet_admin.EndpointSpec`) and the stack parameters' entries (`endpoint_declarations`)
share these rules, so an endpoint one accepts the other accepts too."""

from __future__ import annotations

import hashlib
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict, StringConstraints

from gpuqueue.models import CredentialRef, EndpointProtocol, TaskKind

ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MAX_URL_LENGTH = 2048
MAX_CAPACITY = 64
MAX_WEIGHT = 100


def endpoint_id_for(kind: TaskKind, url: str) -> str:
    """Stable id for a declared URL, so redeploys and re-checks update the same row."""
    return f"{kind.value}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def base_url(value: str) -> str:
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


EndpointUrl = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_URL_LENGTH),
    AfterValidator(base_url),
]
EndpointId = Annotated[str, StringConstraints(pattern=ENDPOINT_ID_PATTERN)]


def protocol_problem(kind: TaskKind, protocol: EndpointProtocol) -> str | None:
    # Speech endpoints speak one protocol: OpenAI-compatible /v1/audio/transcriptions.
    if kind is TaskKind.SPEECH and protocol is not EndpointProtocol.OPENAI:
        return "speech endpoints speak the openai protocol only"
    return None


def callback_problem(protocol: EndpointProtocol, callback: bool) -> str | None:
    # Only Cog starts a job and reports its end by webhook (`Prefer: respond-async`).
    if callback and protocol is not EndpointProtocol.COG:
        return "callback mode is for cog endpoints only (Cog's webhooks)"
    return None


class CredentialSpec(CredentialRef):
    """A credential reference as an operator writes it: unknown keys are refused (a typo
    such as "secert" must not silently send no credentials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
