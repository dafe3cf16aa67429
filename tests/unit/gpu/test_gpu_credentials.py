"""Endpoint credentials: the reference's rules, the stack's prefixes, reading and caching the
value, and that every protocol's adapter and the health probe send it (and treat a 401/403
as a refusal of the credentials, never quoting the key)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import requests
from botocore.exceptions import ClientError
from PIL import Image
from pydantic import ValidationError

from fakes import FakeClock, Reply, Request, reply, serve
from gpuqueue.errors import CredentialUnavailable, EndpointAuthRefused, RetryableGpuError
from gpuqueue.fleet.health_check import probe
from gpuqueue.gpu.credentials import CredentialScope, GpuCredentials
from gpuqueue.gpu.image_client import A1111ImageClient, OpenAIImageClient
from gpuqueue.gpu.speech_client import OpenAITranscriptionClient
from gpuqueue.models import (
    CredentialRef,
    Endpoint,
    EndpointProtocol,
    ImageParams,
    Task,
    TaskKind,
    TaskStatus,
)

TOKEN = "sk-test-7f3a9c"
SCOPE = CredentialScope(secret_prefix="stack/gpu/", parameter_prefix="/stack/gpu/")


def bearer_secret(name: str = "stack/gpu/a") -> CredentialRef:
    return CredentialRef.model_validate({"type": "bearer", "secret": name})


def api_key_parameter(name: str = "/stack/gpu/a", header: str = "X-Api-Key") -> CredentialRef:
    return CredentialRef.model_validate({"type": "header", "header": header, "parameter": name})


def endpoint(credentials: CredentialRef | None = None, **overrides: Any) -> Endpoint:
    fields: dict[str, Any] = {
        "endpoint_id": "gpu-a",
        "url": "http://gpu-a:8000",
        "kind": TaskKind.IMAGE,
        "credentials": credentials,
    }
    return Endpoint(**(fields | overrides))


class FakeSecrets:
    """Secrets Manager's GetSecretValue over a dict; counts reads."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.reads: list[str] = []

    def get_secret_value(self, *, SecretId: str) -> dict[str, Any]:
        self.reads.append(SecretId)
        if SecretId not in self.values:
            raise ClientError(
                {"Error": {"Code": "ResourceNotFoundException", "Message": "not found"}},
                "GetSecretValue",
            )
        return {"SecretString": self.values[SecretId]}


class FakeParameters:
    """SSM's GetParameter over a dict; records whether decryption was asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.calls: list[tuple[str, bool]] = []

    def get_parameter(self, *, Name: str, WithDecryption: bool) -> dict[str, Any]:
        self.calls.append((Name, WithDecryption))
        if Name not in self.values:
            raise ClientError(
                {"Error": {"Code": "ParameterNotFound", "Message": "not found"}}, "GetParameter"
            )
        return {"Parameter": {"Name": Name, "Value": self.values[Name]}}


def resolver(
    secrets: dict[str, str] | None = None,
    parameters: dict[str, str] | None = None,
    *,
    clock: FakeClock | None = None,
    ttl: float = 300.0,
) -> tuple[GpuCredentials, FakeSecrets, FakeParameters]:
    fake_secrets = FakeSecrets(secrets or {})
    fake_parameters = FakeParameters(parameters or {})
    credentials = GpuCredentials(
        SCOPE,
        secrets=lambda: cast(Any, fake_secrets),
        parameters=lambda: cast(Any, fake_parameters),
        ttl_seconds=ttl,
        clock=clock or FakeClock(),
    )
    return credentials, fake_secrets, fake_parameters


# --- the reference --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        pytest.param({"type": "bearer"}, "exactly one of", id="no-store"),
        pytest.param(
            {"type": "bearer", "secret": "stack/gpu/a", "parameter": "/stack/gpu/a"},
            "exactly one of",
            id="two-stores",
        ),
        pytest.param({"type": "header", "secret": "stack/gpu/a"}, "needs 'header'", id="no-name"),
        pytest.param(
            {"type": "bearer", "secret": "stack/gpu/a", "header": "X-Api-Key"},
            "goes with type 'header'",
            id="bearer-with-header",
        ),
        pytest.param(
            {"type": "header", "header": "Content-Length", "secret": "stack/gpu/a"},
            "HTTP client sets it",
            id="reserved-header",
        ),
        pytest.param(
            {"type": "header", "header": "X Api Key", "secret": "stack/gpu/a"},
            "header",
            id="header-with-spaces",
        ),
        pytest.param({"type": "bearer", "parameter": "stack/gpu/a"}, "parameter", id="relative"),
        pytest.param({"type": "basic", "secret": "stack/gpu/a"}, "type", id="unknown-type"),
    ],
)
def test_a_malformed_reference_is_refused_saying_why(reference: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        CredentialRef.model_validate(reference)


def test_the_scope_accepts_names_under_the_stacks_prefixes() -> None:
    assert SCOPE.problem(bearer_secret("stack/gpu/a")) is None
    assert SCOPE.problem(api_key_parameter("/stack/gpu/team/b")) is None


@pytest.mark.parametrize(
    ("reference", "field"),
    [
        (bearer_secret("other-stack/gpu/a"), "secret"),
        (bearer_secret("stack/gpu/"), "secret"),  # the prefix alone names nothing
        (bearer_secret("stack/gpuX"), "secret"),
        (api_key_parameter("/other/gpu/a"), "parameter"),
        (api_key_parameter("/stack/a"), "parameter"),
    ],
)
def test_the_scope_refuses_names_outside_the_prefix_naming_it(
    reference: CredentialRef, field: str
) -> None:
    problem = SCOPE.problem(reference)

    assert problem is not None
    assert problem[0] == field
    assert "outside this stack's GPU credentials" in problem[1]
    assert ("stack/gpu/<name>" if field == "secret" else "/stack/gpu/<name>") in problem[1]


def test_a_stack_without_prefixes_accepts_no_reference() -> None:
    problem = CredentialScope().problem(bearer_secret())

    assert problem is not None
    assert "reads no GPU credentials" in problem[1]


# --- reading and caching --------------------------------------------------------------------


def test_an_endpoint_without_credentials_gets_no_headers_and_nothing_is_read() -> None:
    credentials, secrets, parameters = resolver()

    assert credentials.headers(endpoint()) == {}
    assert secrets.reads == []
    assert parameters.calls == []


def test_a_bearer_secret_becomes_an_authorization_header() -> None:
    credentials, _, _ = resolver({"stack/gpu/a": TOKEN})

    assert credentials.headers(endpoint(bearer_secret())) == {"Authorization": f"Bearer {TOKEN}"}


def test_an_api_key_parameter_is_read_decrypted_into_its_header() -> None:
    credentials, _, parameters = resolver(parameters={"/stack/gpu/a": TOKEN})

    assert credentials.headers(endpoint(api_key_parameter())) == {"X-Api-Key": TOKEN}
    assert parameters.calls == [("/stack/gpu/a", True)]


@pytest.mark.parametrize(
    "stored", [f"{TOKEN}\n", f"  {TOKEN} ", f"Bearer {TOKEN}", f"bearer {TOKEN}\n"]
)
def test_surrounding_whitespace_and_a_stored_scheme_are_not_sent_twice(stored: str) -> None:
    credentials, _, _ = resolver({"stack/gpu/a": stored})

    assert credentials.headers(endpoint(bearer_secret())) == {"Authorization": f"Bearer {TOKEN}"}


def test_a_value_is_read_once_per_ttl_then_again_so_a_rotation_is_picked_up() -> None:
    clock = FakeClock()
    credentials, secrets, _ = resolver({"stack/gpu/a": "old"}, clock=clock, ttl=300)
    for _ in range(5):
        credentials.headers(endpoint(bearer_secret()))
    secrets.values["stack/gpu/a"] = "new"
    clock.now += 299

    assert credentials.headers(endpoint(bearer_secret()))["Authorization"] == "Bearer old"
    clock.now += 1
    assert credentials.headers(endpoint(bearer_secret()))["Authorization"] == "Bearer new"
    assert len(secrets.reads) == 2


def test_a_refusal_forgets_the_cached_value_so_the_next_call_reads_it_again() -> None:
    credentials, secrets, _ = resolver({"stack/gpu/a": "old"})
    gpu = endpoint(bearer_secret())
    credentials.headers(gpu)
    secrets.values["stack/gpu/a"] = "new"  # rotated on both sides

    with pytest.raises(EndpointAuthRefused):
        credentials.send(gpu, lambda headers: FakeResponse(401))
    assert credentials.headers(gpu)["Authorization"] == "Bearer new"


@pytest.mark.parametrize(
    ("secrets", "says"),
    [
        pytest.param(
            {}, "secret stack/gpu/a could not be read: ResourceNotFoundException", id="gone"
        ),
        pytest.param({"stack/gpu/a": "  \n"}, "secret stack/gpu/a is empty", id="empty"),
        pytest.param({"stack/gpu/a": "abc\r\nX-Evil: 1"}, "line break", id="header-injection"),
    ],
)
def test_a_credential_that_cannot_be_used_is_unavailable_naming_where_it_is(
    secrets: dict[str, str], says: str
) -> None:
    credentials, _, _ = resolver(secrets)

    with pytest.raises(CredentialUnavailable, match=says) as raised:
        credentials.headers(endpoint(bearer_secret()))
    assert raised.value.retryable
    assert "X-Evil" not in str(raised.value)


def test_a_reference_outside_the_scope_is_never_read() -> None:
    credentials, secrets, _ = resolver({"elsewhere/key": TOKEN})

    with pytest.raises(CredentialUnavailable, match=r"credentials\.secret: 'elsewhere/key'"):
        credentials.headers(endpoint(bearer_secret("elsewhere/key")))
    assert secrets.reads == []


def test_without_a_client_an_endpoint_naming_credentials_is_never_called_bare() -> None:
    with pytest.raises(CredentialUnavailable, match="cannot read secret stack/gpu/a"):
        GpuCredentials(SCOPE).headers(endpoint(bearer_secret()))


# --- refusals -------------------------------------------------------------------------------


@dataclass
class FakeResponse:
    status_code: int
    text: str = f"invalid key {TOKEN}"


@pytest.mark.parametrize("status", [401, 403])
def test_a_401_or_403_is_a_retryable_refusal_naming_the_secret_not_the_key(status: int) -> None:
    credentials, _, _ = resolver({"stack/gpu/a": TOKEN})

    with pytest.raises(EndpointAuthRefused) as raised:
        credentials.send(endpoint(bearer_secret()), lambda headers: FakeResponse(status))

    message = str(raised.value)
    assert isinstance(raised.value, RetryableGpuError)
    assert f"HTTP {status}" in message
    assert "secret stack/gpu/a" in message
    assert TOKEN not in message  # the body echoed it; the error does not


def test_a_401_from_an_endpoint_without_credentials_says_it_wants_some() -> None:
    credentials, _, _ = resolver()

    with pytest.raises(EndpointAuthRefused, match="wants credentials"):
        credentials.send(endpoint(), lambda headers: FakeResponse(401))


# --- every adapter and the probe send them --------------------------------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class FakeGpu:
    """Answers every protocol's route and /health, or `status` with a body echoing the key."""

    status: int = 200
    seen: list[Seen] = field(default_factory=list)


def _png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _answers(state: FakeGpu) -> Callable[[Request], Reply]:
    answers = {
        "/v1/images/generations": {"data": [{"b64_json": _png_b64()}]},
        "/sdapi/v1/txt2img": {"images": [_png_b64()]},
        "/v1/audio/transcriptions": {"text": "hello world"},
        "/health": {"status": "ok"},
    }

    def answer(request: Request) -> Reply:
        state.seen.append(Seen(request.path, {k.lower(): v for k, v in request.headers.items()}))
        status = state.status
        return reply(
            status, answers[request.path] if status == 200 else {"error": f"bad key {TOKEN}"}
        )

    return answer


@pytest.fixture
def gpu() -> Iterator[tuple[FakeGpu, str]]:
    state = FakeGpu()
    with serve(_answers(state)) as url:
        yield state, url


TASK = Task(
    task_id="t-1",
    user_id="u-1",
    status=TaskStatus.RUNNING,
    prompt="a fox",
    params=ImageParams(width=64, height=64, steps=1),
    created_at="2026-01-01T00:00:00.000000Z",
    updated_at="2026-01-01T00:00:00.000000Z",
)


def _call(kind: str, target: Endpoint, credentials: GpuCredentials) -> Any:
    """One call through the adapter (or the probe) named `kind`."""
    if kind == "openai":
        return OpenAIImageClient(credentials=credentials).generate(target, TASK, timeout_seconds=5)
    if kind == "a1111":
        client = A1111ImageClient(credentials=credentials)
        return client.generate(
            target.model_copy(update={"protocol": EndpointProtocol.A1111}), TASK, timeout_seconds=5
        )
    if kind == "speech":
        return OpenAITranscriptionClient(credentials=credentials).transcribe(
            target.model_copy(update={"kind": TaskKind.SPEECH}),
            b"RIFF....WAVE",
            filename="a.wav",
            content_type="audio/wav",
            language=None,
            prompt=None,
            timeout_seconds=5,
        )
    return probe(requests.Session(), target, timeout_seconds=2, credentials=credentials)


CALLS = ["openai", "a1111", "speech", "probe"]
PATHS = {
    "openai": "/v1/images/generations",
    "a1111": "/sdapi/v1/txt2img",
    "speech": "/v1/audio/transcriptions",
    "probe": "/health",
}


@pytest.mark.parametrize("kind", CALLS)
def test_every_adapter_and_the_health_probe_send_the_bearer_token(
    gpu: tuple[FakeGpu, str], kind: str
) -> None:
    state, url = gpu
    credentials, _, _ = resolver({"stack/gpu/a": TOKEN})

    _call(kind, endpoint(bearer_secret(), url=url), credentials)

    assert [s.path for s in state.seen] == [PATHS[kind]]
    assert state.seen[0].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("kind", CALLS)
def test_every_adapter_and_the_health_probe_send_an_api_key_header(
    gpu: tuple[FakeGpu, str], kind: str
) -> None:
    state, url = gpu
    credentials, _, _ = resolver(parameters={"/stack/gpu/a": TOKEN})

    _call(kind, endpoint(api_key_parameter(), url=url), credentials)

    assert state.seen[0].headers["x-api-key"] == TOKEN
    assert "authorization" not in state.seen[0].headers


@pytest.mark.parametrize("kind", ["openai", "a1111", "speech"])
@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_call_is_an_auth_refusal_on_every_adapter(
    gpu: tuple[FakeGpu, str], kind: str, status: int
) -> None:
    state, url = gpu
    state.status = status
    credentials, _, _ = resolver({"stack/gpu/a": TOKEN})

    with pytest.raises(EndpointAuthRefused) as raised:
        _call(kind, endpoint(bearer_secret(), url=url), credentials)
    assert TOKEN not in str(raised.value)


def test_a_refused_health_probe_makes_the_endpoint_unhealthy_saying_why(
    gpu: tuple[FakeGpu, str],
) -> None:
    state, url = gpu
    state.status = 401
    credentials, _, _ = resolver({"stack/gpu/a": TOKEN})

    result = _call("probe", endpoint(bearer_secret(), url=url), credentials)

    assert result.healthy is False
    assert result.error is not None
    assert "refused its credentials (HTTP 401)" in result.error
    assert TOKEN not in result.error


def test_a_probe_whose_credential_cannot_be_read_is_unhealthy_and_never_calls(
    gpu: tuple[FakeGpu, str],
) -> None:
    state, url = gpu
    credentials, _, _ = resolver({})  # the secret does not exist

    result = _call("probe", endpoint(bearer_secret(), url=url), credentials)

    assert result.healthy is False
    assert result.error is not None
    assert "could not be read: ResourceNotFoundException" in result.error
    assert state.seen == []
