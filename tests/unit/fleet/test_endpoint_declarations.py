"""What a deploy declares in ImageEndpoints/SpeechEndpoints (and the URL lists): each entry
validated alone, refusals naming the parameter, entry, field and reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpuqueue.fleet.endpoint_declarations import DeclaredEndpoint, read_declarations
from gpuqueue.fleet.endpoint_specs import endpoint_id_for
from gpuqueue.gpu.credentials import CredentialScope
from gpuqueue.models import CredentialRef, EndpointProtocol, TaskKind

SCOPE = CredentialScope(secret_prefix="prod/gpu/", parameter_prefix="/prod/gpu/")


def read(
    image: Any = "",
    speech: Any = "",
    *,
    image_urls: list[str] | None = None,
    speech_urls: list[str] | None = None,
) -> Any:
    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    return read_declarations(
        urls={TaskKind.IMAGE: image_urls or [], TaskKind.SPEECH: speech_urls or []},
        entries={TaskKind.IMAGE: text(image), TaskKind.SPEECH: text(speech)},
        scope=SCOPE,
    )


def errors(declarations: Any) -> list[str]:
    return [str(e) for d in declarations.values() for e in d.errors]


def test_nothing_declared_is_an_empty_fleet_without_errors() -> None:
    declared = read()

    assert declared[TaskKind.IMAGE].endpoints == []
    assert declared[TaskKind.SPEECH].endpoints == []
    assert errors(declared) == []


def test_the_url_list_declares_openai_endpoints_with_url_derived_ids_as_before() -> None:
    declared = read(image_urls=["http://gpu-a:8000", "http://gpu-b:8000/v1"])

    assert declared[TaskKind.IMAGE].endpoints == [
        DeclaredEndpoint(endpoint_id_for(TaskKind.IMAGE, "http://gpu-a:8000"), "http://gpu-a:8000"),
        DeclaredEndpoint(
            endpoint_id_for(TaskKind.IMAGE, "http://gpu-b:8000/v1"), "http://gpu-b:8000/v1"
        ),
    ]


def test_an_entry_declares_protocol_capacity_weight_and_a_credential_reference() -> None:
    declared = read(
        [
            {
                "id": "sd-1",
                "url": "https://sd-1.internal:7860/",
                "protocol": "a1111",
                "capacity": 4,
                "weight": 3,
                "credentials": {"type": "bearer", "secret": "prod/gpu/sd-1"},
            }
        ]
    )

    assert declared[TaskKind.IMAGE].endpoints == [
        DeclaredEndpoint(
            endpoint_id="sd-1",
            url="https://sd-1.internal:7860",
            protocol=EndpointProtocol.A1111,
            capacity=4,
            weight=3,
            credentials=CredentialRef.model_validate({"type": "bearer", "secret": "prod/gpu/sd-1"}),
        )
    ]


def test_an_entry_without_an_id_gets_the_id_its_url_would_have_in_the_url_list() -> None:
    declared = read([{"url": "http://gpu-a:8000"}])

    (endpoint,) = declared[TaskKind.IMAGE].endpoints
    assert endpoint.endpoint_id == endpoint_id_for(TaskKind.IMAGE, "http://gpu-a:8000")
    assert (endpoint.protocol, endpoint.capacity, endpoint.weight) == (
        EndpointProtocol.OPENAI,
        None,
        None,
    )


def test_a_speech_entry_with_an_api_key_header_from_ssm() -> None:
    declared = read(
        speech=[
            {
                "id": "whisper-1",
                "url": "http://10.0.3.7:8000",
                "credentials": {
                    "type": "header",
                    "header": "X-Api-Key",
                    "parameter": "/prod/gpu/whisper",
                },
            }
        ]
    )

    (endpoint,) = declared[TaskKind.SPEECH].endpoints
    assert endpoint.credentials is not None
    assert endpoint.credentials.header == "X-Api-Key"
    assert endpoint.credentials.parameter == "/prod/gpu/whisper"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param(
            {"id": "b", "url": "http://b", "capacity": 0},
            "ImageEndpoints[1] (b).capacity: Input should be greater than or equal to 1",
            id="capacity",
        ),
        pytest.param(
            {"id": "b", "url": "http://b", "capactiy": 2},
            "ImageEndpoints[1] (b).capactiy: Extra inputs are not permitted",
            id="typo",
        ),
        pytest.param(
            {"id": "b", "url": "ftp://b"},
            "ImageEndpoints[1] (b).url: Value error, must be an http:// or https:// URL",
            id="url",
        ),
        pytest.param(
            {"id": "b", "url": "http://b", "protocol": "triton"},
            "ImageEndpoints[1] (b).protocol: Input should be 'openai', 'a1111', 'comfyui' or 'cog'",
            id="protocol",
        ),
        pytest.param(
            {"id": "b c", "url": "http://b"},
            "ImageEndpoints[1] (b c).id: String should match pattern",
            id="id",
        ),
        pytest.param(
            {"id": "b", "url": "http://b", "credentials": {"type": "bearer", "secert": "x"}},
            "ImageEndpoints[1] (b).credentials.secert: Extra inputs are not permitted",
            id="credentials-typo",
        ),
        pytest.param(
            {"id": "b", "url": "http://b", "credentials": {"type": "bearer", "secret": "dev/k"}},
            "ImageEndpoints[1] (b).credentials.secret: 'dev/k' is outside this stack's GPU "
            "credentials: name it prod/gpu/<name>",
            id="outside-prefix",
        ),
        pytest.param("http://b", "ImageEndpoints[1]: Input should be a valid dictionary", id="str"),
    ],
)
def test_a_bad_entry_is_refused_naming_it_and_the_good_ones_are_declared(
    entry: Any, message: str
) -> None:
    declared = read([{"id": "a", "url": "http://a"}, entry, {"id": "c", "url": "http://c"}])

    assert [e.endpoint_id for e in declared[TaskKind.IMAGE].endpoints] == ["a", "c"]
    (refusal,) = errors(declared)
    assert refusal.startswith(message)


def test_a_refusal_never_quotes_what_was_given() -> None:
    key = "sk-live-pasted-by-mistake"
    declared = read([{"id": "a", "url": "http://a", "credentials": key, "weight": key}])

    assert errors(declared)
    assert all(key not in error for error in errors(declared))


def test_a_speech_entry_speaks_openai_only() -> None:
    declared = read(speech=[{"id": "s", "url": "http://s", "protocol": "a1111"}])

    assert declared[TaskKind.SPEECH].endpoints == []
    assert errors(declared) == [
        "SpeechEndpoints[0] (s).protocol: speech endpoints speak the openai protocol only"
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[{]", "ImageEndpoints: not valid JSON: "),
        ('{"url": "http://a"}', "ImageEndpoints: must be a JSON list of endpoint objects"),
    ],
)
def test_a_parameter_that_is_not_a_json_list_is_refused_whole(raw: str, message: str) -> None:
    declared = read(raw, image_urls=["http://gpu-a:8000"])

    assert len(declared[TaskKind.IMAGE].endpoints) == 1  # the URL list still counts
    (refusal,) = errors(declared)
    assert refusal.startswith(message)


def test_the_same_id_twice_is_refused_even_across_kinds() -> None:
    declared = read([{"id": "gpu-1", "url": "http://a"}], [{"id": "gpu-1", "url": "http://s"}])

    assert [e.endpoint_id for e in declared[TaskKind.IMAGE].endpoints] == ["gpu-1"]
    assert declared[TaskKind.SPEECH].endpoints == []
    assert errors(declared) == [
        "SpeechEndpoints[0] (gpu-1).id: gpu-1 is already declared by ImageEndpoints[0]"
    ]


def test_the_same_server_twice_in_a_kind_is_refused() -> None:
    declared = read(
        [{"id": "other", "url": "http://gpu-a:8000/"}], image_urls=["http://gpu-a:8000"]
    )

    assert len(declared[TaskKind.IMAGE].endpoints) == 1
    assert errors(declared) == [
        "ImageEndpoints[0] (other).url: already declared by ImageEndpointUrls[0] "
        "(one entry per server)"
    ]


def test_a_bad_url_in_the_url_list_is_refused_naming_its_position() -> None:
    declared = read(image_urls=["http://gpu-a:8000", "gpu-b:8000"])

    assert len(declared[TaskKind.IMAGE].endpoints) == 1
    assert errors(declared) == [
        "ImageEndpointUrls[1]: Value error, must be an http:// or https:// URL"
    ]
