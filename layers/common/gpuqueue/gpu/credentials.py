"""GPU endpoint credentials: the one place an endpoint's credential reference becomes
request headers, whatever the protocol (every adapter and the health probe go through
`GpuCredentials.send`).

An endpoint names where its API key or bearer token is kept (`models.CredentialRef`),
never the value. Values are read with the function's own role, which may read only this
stack's GPU credentials: Secrets Manager secrets named `<stack>/gpu/...` and SSM parameters
under `/<stack>/gpu/` (`CredentialScope`; template.yaml grants exactly those prefixes, to
the functions that call GPUs). A value is kept per container for a short TTL, so a rotation
is picked up within minutes, and forgotten at once when an endpoint refuses it (401/403):
after a rotation on both sides the next call reads the new value.

A value never leaves this module except as a header of a GPU request: errors and logs
name the secret or parameter, never what it holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from gpuqueue.errors import CredentialUnavailable, EndpointAuthRefused
from gpuqueue.models import CredentialRef, CredentialScheme, Endpoint

if TYPE_CHECKING:
    # Only annotations: the functions that never call a GPU need not import requests.
    import requests
    from mypy_boto3_secretsmanager import SecretsManagerClient
    from mypy_boto3_ssm import SSMClient

# What a server answers when it refuses the caller rather than the request.
REFUSED_STATUSES = frozenset({401, 403})
# Long enough to spare Secrets Manager a read per call, short enough that a rotated value
# is used within minutes (a refusal drops it at once anyway).
DEFAULT_TTL_SECONDS = 300.0


@dataclass(frozen=True)
class CredentialScope:
    """Where this stack's functions may read GPU credentials: a secret name prefix and an
    SSM parameter path prefix (None: none of that kind may be named)."""

    secret_prefix: str | None = None
    parameter_prefix: str | None = None

    def problem(self, ref: CredentialRef) -> tuple[str, str] | None:
        """(field, why) when `ref` names something outside the scope, else None."""
        if ref.secret is not None:
            return _outside("secret", ref.secret, self.secret_prefix, "GPU_SECRET_PREFIX")
        assert ref.parameter is not None  # CredentialRef names exactly one of the two
        return _outside("parameter", ref.parameter, self.parameter_prefix, "GPU_PARAMETER_PREFIX")


def _outside(field: str, name: str, prefix: str | None, setting: str) -> tuple[str, str] | None:
    if not prefix:
        return field, f"this stack reads no GPU credentials from a {field} ({setting} unset)"
    if not name.startswith(prefix) or len(name) == len(prefix):
        return field, (
            f"{name!r} is outside this stack's GPU credentials: name it {prefix}<name> "
            "(the functions may read only those)"
        )
    return None


@dataclass(frozen=True)
class _Cached:
    value: str
    read_at: float


class GpuCredentials:
    """Turns endpoints' credential references into request headers; values cached per
    container for `ttl_seconds`. Thread-safe (the checker probes from a thread pool)."""

    def __init__(
        self,
        scope: CredentialScope | None = None,
        *,
        secrets: Callable[[], SecretsManagerClient] | None = None,
        parameters: Callable[[], SSMClient] | None = None,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scope = scope or CredentialScope()
        # Factories, not clients: a function whose endpoints name no credentials never
        # builds (or pays the cold start of) a client it does not use.
        self._secrets = secrets
        self._parameters = parameters
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[CredentialRef, _Cached] = {}

    def headers(self, endpoint: Endpoint) -> dict[str, str]:
        """The headers that authenticate a call to this endpoint ({} if it needs none)."""
        ref = endpoint.credentials
        if ref is None:
            return {}
        value = self._value(endpoint, ref)
        if ref.type is CredentialScheme.BEARER:
            # A value stored with its scheme ("Bearer abc") is not sent as "Bearer Bearer abc".
            token = value[7:].lstrip() if value[:7].lower() == "bearer " else value
            return {"Authorization": f"Bearer {token}"}
        assert ref.header is not None  # CredentialRef requires it for type "header"
        return {ref.header: value}

    def send(
        self,
        endpoint: Endpoint,
        request: Callable[[Mapping[str, str]], requests.Response],
    ) -> requests.Response:
        """Make `request` with the endpoint's credential headers; a 401/403 answer raises
        EndpointAuthRefused (and drops the cached value, in case it was rotated)."""
        response = request(self.headers(endpoint))
        if response.status_code in REFUSED_STATUSES:
            self.forget(endpoint)
            raise refused(endpoint, response.status_code)
        return response

    def forget(self, endpoint: Endpoint) -> None:
        if endpoint.credentials is not None:
            with self._lock:
                self._cache.pop(endpoint.credentials, None)

    def _value(self, endpoint: Endpoint, ref: CredentialRef) -> str:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(ref)
        if cached is not None and now - cached.read_at < self._ttl:
            return cached.value
        problem = self._scope.problem(ref)
        if problem is not None:
            raise CredentialUnavailable(
                f"endpoint {endpoint.endpoint_id}: credentials.{problem[0]}: {problem[1]}"
            )
        # Read outside the lock: a slow read for one endpoint never holds up the others
        # (two threads may both read a value once; that is harmless).
        value = self._read(endpoint, ref).strip()
        if not value:
            raise CredentialUnavailable(
                f"endpoint {endpoint.endpoint_id}: its credential {ref.store} is empty"
            )
        if any(ch in value for ch in "\r\n\0"):
            raise CredentialUnavailable(
                f"endpoint {endpoint.endpoint_id}: its credential {ref.store} holds a line "
                "break, which no header value may"
            )
        with self._lock:
            self._cache[ref] = _Cached(value=value, read_at=now)
        return value

    def _read(self, endpoint: Endpoint, ref: CredentialRef) -> str:
        try:
            if ref.secret is not None:
                if self._secrets is None:
                    raise _no_client(endpoint, ref)
                answer = self._secrets().get_secret_value(SecretId=ref.secret)
                if "SecretString" not in answer:
                    raise CredentialUnavailable(
                        f"endpoint {endpoint.endpoint_id}: its credential {ref.store} holds "
                        "binary data; store the key or token as a string"
                    )
                return answer["SecretString"]
            assert ref.parameter is not None
            if self._parameters is None:
                raise _no_client(endpoint, ref)
            parameter = self._parameters().get_parameter(Name=ref.parameter, WithDecryption=True)
            return parameter["Parameter"].get("Value", "")
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "error")
            raise CredentialUnavailable(
                f"endpoint {endpoint.endpoint_id}: its credential {ref.store} could not be "
                f"read: {code}"
            ) from error
        except BotoCoreError as error:
            raise CredentialUnavailable(
                f"endpoint {endpoint.endpoint_id}: its credential {ref.store} could not be "
                f"read: {type(error).__name__}"
            ) from error


def _no_client(endpoint: Endpoint, ref: CredentialRef) -> CredentialUnavailable:
    return CredentialUnavailable(
        f"endpoint {endpoint.endpoint_id}: this function cannot read {ref.store}"
    )


def refused(endpoint: Endpoint, status: int) -> EndpointAuthRefused:
    """The error for a 401/403 answer. The body is left out: a server may echo the key."""
    if endpoint.credentials is None:
        return EndpointAuthRefused(
            f"endpoint {endpoint.endpoint_id} wants credentials (HTTP {status}): give it a "
            "credentials reference to a secret holding its key"
        )
    return EndpointAuthRefused(
        f"endpoint {endpoint.endpoint_id} refused its credentials (HTTP {status}): check "
        f"that {endpoint.credentials.store} holds the key the server expects"
    )
