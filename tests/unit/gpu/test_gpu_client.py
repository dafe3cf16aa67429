"""The GPU protocol adapters: what each one sends and how it classifies what comes back."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, cast

import pytest
import requests
from PIL import Image
from urllib3 import HTTPResponse

from gpuqueue.errors import PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.cog_client import CogImageClient
from gpuqueue.gpu.image_client import (
    A1111ImageClient,
    OpenAIImageClient,
    decode_png,
    image_generators,
)
from gpuqueue.models import Endpoint, EndpointProtocol, ImageParams, Task, TaskKind, TaskStatus

ENDPOINT = Endpoint(endpoint_id="gpu-a", url="http://gpu-a:8000/", kind=TaskKind.IMAGE)
A1111_ENDPOINT = Endpoint(
    endpoint_id="sd-a",
    url="http://sd-a:7860/",
    kind=TaskKind.IMAGE,
    protocol=EndpointProtocol.A1111,
)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def response(status: int, body: bytes | dict[str, Any]) -> requests.Response:
    """An answer as `requests` gives it with `stream=True`: the body not read yet."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    result = requests.Response()
    result.status_code = status
    result.raw = HTTPResponse(body=io.BytesIO(data), status=status, preload_content=False)
    result.encoding = "utf-8"
    return result


def image_body(data: bytes) -> dict[str, Any]:
    return {"created": 1, "data": [{"b64_json": base64.b64encode(data).decode()}]}


def task(*, seed: int | None = None, negative_prompt: str | None = None) -> Task:
    return Task(
        task_id="task-1",
        user_id="user-1",
        status=TaskStatus.RUNNING,
        prompt="a red fox in snow",
        negative_prompt=negative_prompt,
        params=ImageParams(width=640, height=480, steps=20, seed=seed),
        created_at="2026-01-27T10:00:00.000000Z",
        updated_at="2026-01-27T10:00:00.000000Z",
    )


class FakeSession:
    """Records each post; answers with a canned response or raises a canned error."""

    def __init__(self, answer: requests.Response | Exception) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def post(
        self,
        url: str,
        *,
        json: dict[str, Any],
        timeout: tuple[float, float],
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> Any:
        self.calls.append(
            {"url": url, "json": json, "timeout": timeout, "headers": headers, "stream": stream}
        )
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def client(session: FakeSession) -> OpenAIImageClient:
    return OpenAIImageClient(session=cast(requests.Session, session))


def a1111(session: FakeSession) -> A1111ImageClient:
    return A1111ImageClient(session=cast(requests.Session, session))


def a1111_body(data: bytes) -> dict[str, Any]:
    return {"images": [base64.b64encode(data).decode()], "parameters": {}, "info": "{}"}


# --- decode_png -----------------------------------------------------------------------------


def test_a_png_in_the_answer_is_returned_as_bytes() -> None:
    png = png_bytes()

    assert decode_png(ENDPOINT, response(200, image_body(png))) == png


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_busy_or_broken_endpoint_answers_are_worth_retrying(status: int) -> None:
    with pytest.raises(RetryableGpuError, match=str(status)):
        decode_png(ENDPOINT, response(status, {"error": "overloaded"}))


# 401/403 never get here: the adapters treat them as a refusal of the credentials
# (tests/unit/gpu/test_gpu_credentials.py).
@pytest.mark.parametrize("status", [400, 404, 422])
def test_rejections_of_the_request_are_permanent(status: int) -> None:
    with pytest.raises(PermanentGpuError, match=str(status)):
        decode_png(ENDPOINT, response(status, {"error": "bad size"}))


def test_a_rejection_includes_what_the_endpoint_said() -> None:
    with pytest.raises(PermanentGpuError, match="size must be a multiple of 64"):
        decode_png(ENDPOINT, response(400, b"size must be a multiple of 64"))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>Bad Gateway</html>", id="not-json"),
        pytest.param({}, id="no-data"),
        pytest.param({"data": []}, id="empty-data"),
        pytest.param({"data": [{"url": "http://x/y.png"}]}, id="url-instead-of-b64"),
        pytest.param({"data": [{"b64_json": "not base64 at all!"}]}, id="bad-base64"),
    ],
)
def test_an_unreadable_success_answer_is_permanent(body: bytes | dict[str, Any]) -> None:
    with pytest.raises(PermanentGpuError, match="unreadable"):
        decode_png(ENDPOINT, response(200, body))


def test_an_image_that_is_not_a_png_is_permanent() -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32

    with pytest.raises(PermanentGpuError, match="not a PNG"):
        decode_png(ENDPOINT, response(200, image_body(jpeg)))


# --- OpenAIImageClient.generate -------------------------------------------------------------


def test_generate_returns_the_png_from_the_endpoint() -> None:
    png = png_bytes()

    assert (
        client(FakeSession(response(200, image_body(png)))).generate(
            ENDPOINT, task(), timeout_seconds=60
        )
        == png
    )


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectTimeout("connect timed out"),
        requests.ReadTimeout("read timed out"),
        requests.ConnectionError("connection refused"),
    ],
    ids=type,
)
def test_an_endpoint_that_cannot_be_reached_in_time_is_worth_retrying(error: Exception) -> None:
    with pytest.raises(RetryableGpuError, match="gpu-a"):
        client(FakeSession(error)).generate(ENDPOINT, task(), timeout_seconds=60)


def test_generate_posts_to_the_openai_images_path_of_the_endpoint() -> None:
    session = FakeSession(response(200, image_body(png_bytes())))

    client(session).generate(ENDPOINT, task(), timeout_seconds=60)

    assert session.calls[0]["url"] == "http://gpu-a:8000/v1/images/generations"


def test_generate_asks_for_one_base64_image_of_the_requested_size() -> None:
    session = FakeSession(response(200, image_body(png_bytes())))

    client(session).generate(ENDPOINT, task(), timeout_seconds=60)

    assert session.calls[0]["json"] == {
        "prompt": "a red fox in snow",
        "n": 1,
        "size": "640x480",
        "response_format": "b64_json",
        "steps": 20,
    }


def test_generate_sends_seed_and_negative_prompt_when_the_task_has_them() -> None:
    session = FakeSession(response(200, image_body(png_bytes())))

    client(session).generate(ENDPOINT, task(seed=0, negative_prompt="blurry"), timeout_seconds=60)

    body = session.calls[0]["json"]
    assert (body["seed"], body["negative_prompt"]) == (0, "blurry")


@pytest.mark.parametrize(("budget", "expected"), [(60.0, (3.0, 60.0)), (2.0, (2.0, 2.0))])
def test_generate_caps_connect_and_read_timeouts_by_the_budget(
    budget: float, expected: tuple[float, float]
) -> None:
    session = FakeSession(response(200, image_body(png_bytes())))

    client(session).generate(ENDPOINT, task(), timeout_seconds=budget)

    assert session.calls[0]["timeout"] == expected


# --- A1111ImageClient.generate --------------------------------------------------------------


def test_a1111_posts_to_the_txt2img_path_of_the_endpoint() -> None:
    session = FakeSession(response(200, a1111_body(png_bytes())))

    a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60)

    assert session.calls[0]["url"] == "http://sd-a:7860/sdapi/v1/txt2img"


def test_a1111_asks_for_one_image_with_the_task_parameters() -> None:
    session = FakeSession(response(200, a1111_body(png_bytes())))

    a1111(session).generate(
        A1111_ENDPOINT, task(seed=42, negative_prompt="blurry"), timeout_seconds=60
    )

    assert session.calls[0]["json"] == {
        "prompt": "a red fox in snow",
        "negative_prompt": "blurry",
        "width": 640,
        "height": 480,
        "steps": 20,
        "seed": 42,
        "batch_size": 1,
        "n_iter": 1,
    }


def test_a1111_sends_an_empty_negative_prompt_when_the_task_has_none() -> None:
    session = FakeSession(response(200, a1111_body(png_bytes())))

    a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60)

    assert session.calls[0]["json"]["negative_prompt"] == ""


def test_a1111_asks_for_a_random_seed_when_the_task_has_none() -> None:
    session = FakeSession(response(200, a1111_body(png_bytes())))

    a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60)

    assert session.calls[0]["json"]["seed"] == -1


def test_a1111_sends_seed_zero_as_zero() -> None:
    session = FakeSession(response(200, a1111_body(png_bytes())))

    a1111(session).generate(A1111_ENDPOINT, task(seed=0), timeout_seconds=60)

    assert session.calls[0]["json"]["seed"] == 0


def test_a1111_caps_connect_and_read_timeouts_by_the_budget() -> None:
    session = FakeSession(response(200, a1111_body(png_bytes())))

    a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=2.0)

    assert session.calls[0]["timeout"] == (2.0, 2.0)


def test_a1111_returns_the_png_from_the_endpoint() -> None:
    png = png_bytes()
    session = FakeSession(response(200, a1111_body(png)))

    assert a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60) == png


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_a1111_busy_or_broken_answers_are_worth_retrying(status: int) -> None:
    session = FakeSession(response(status, {"error": "CUDA out of memory"}))

    with pytest.raises(RetryableGpuError, match=str(status)):
        a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60)


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a1111_rejections_of_the_request_are_permanent(status: int) -> None:
    session = FakeSession(response(status, {"detail": "width must be a multiple of 8"}))

    with pytest.raises(PermanentGpuError, match=str(status)):
        a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>Internal error page</html>", id="not-json"),
        pytest.param({}, id="no-images"),
        pytest.param({"images": []}, id="empty-images"),
        pytest.param({"images": [123]}, id="image-not-a-string"),
        pytest.param({"images": ["not base64 at all!"]}, id="bad-base64"),
        pytest.param(image_body(b"\x89PNG\r\n\x1a\n"), id="openai-shape"),
    ],
)
def test_a1111_unreadable_success_answer_is_permanent(body: bytes | dict[str, Any]) -> None:
    session = FakeSession(response(200, body))

    with pytest.raises(PermanentGpuError, match="unreadable"):
        a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60)


def test_a1111_image_that_is_not_a_png_is_permanent() -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32
    session = FakeSession(response(200, a1111_body(jpeg)))

    with pytest.raises(PermanentGpuError, match="not a PNG"):
        a1111(session).generate(A1111_ENDPOINT, task(), timeout_seconds=60)


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectTimeout("connect timed out"),
        requests.ReadTimeout("read timed out"),
        requests.ConnectionError("connection refused"),
    ],
    ids=type,
)
def test_a1111_endpoint_that_cannot_be_reached_in_time_is_worth_retrying(
    error: Exception,
) -> None:
    with pytest.raises(RetryableGpuError, match="sd-a"):
        a1111(FakeSession(error)).generate(A1111_ENDPOINT, task(), timeout_seconds=60)


# --- image_generators -----------------------------------------------------------------------


def test_image_generators_has_one_adapter_per_protocol() -> None:
    generators = image_generators(cast(requests.Session, FakeSession(response(200, {}))))

    assert set(generators) == set(EndpointProtocol)


@pytest.mark.parametrize(
    ("protocol", "adapter"),
    [
        (EndpointProtocol.OPENAI, OpenAIImageClient),
        (EndpointProtocol.A1111, A1111ImageClient),
        (EndpointProtocol.COG, CogImageClient),
    ],
)
def test_image_generators_maps_each_protocol_to_its_adapter(
    protocol: EndpointProtocol, adapter: type
) -> None:
    generators = image_generators(cast(requests.Session, FakeSession(response(200, {}))))

    assert isinstance(generators[protocol], adapter)


def test_image_generators_share_the_given_session() -> None:
    png = png_bytes()
    session = FakeSession(response(200, {**image_body(png), **a1111_body(png)}))
    generators = image_generators(cast(requests.Session, session))

    generators[EndpointProtocol.OPENAI].generate(ENDPOINT, task(), timeout_seconds=60)
    session.answer = response(200, {**image_body(png), **a1111_body(png)})  # a body reads once
    generators[EndpointProtocol.A1111].generate(A1111_ENDPOINT, task(), timeout_seconds=60)

    assert [c["url"] for c in session.calls] == [
        "http://gpu-a:8000/v1/images/generations",
        "http://sd-a:7860/sdapi/v1/txt2img",
    ]
