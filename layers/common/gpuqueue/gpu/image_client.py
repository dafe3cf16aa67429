"""GPU protocol adapters. One adapter per wire protocol, behind one small interface.

Every adapter sends its endpoint's credentials through `GpuCredentials.send` (one place for
every protocol); a 401/403 answer is `EndpointAuthRefused`, retryable elsewhere.
"""

from __future__ import annotations

import base64
import binascii
from typing import Protocol

import requests
from pydantic import BaseModel, ValidationError

from gpuqueue.errors import GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.call_watch import NO_WATCH, CallWatch
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.http_deadline import AnswerOverLimit, post_within
from gpuqueue.gpu.memory_budget import MIB, AnswerTooLarge, MemoryHold
from gpuqueue.models import Endpoint, EndpointProtocol, ImageParams, Task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONNECT_TIMEOUT_SECONDS = 3.0
# Responses a GPU server gives when it is busy or sick, not when our request is wrong.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# An image answer in memory while read and decoded: the body, the base64 text parsed out of
# it, the PNG decoded from that (1 + 1 + 3/4 of the body), rounded up.
IMAGE_ANSWER_IN_MEMORY = 3.0
# Uncompressed answers: their Content-Length says what to reserve before the body is read
# (gzip would hide it, and saves little on base64 PNG inside a VPC).
IDENTITY = {"Accept-Encoding": "identity"}


def image_answer_limit(params: ImageParams) -> int:
    """The largest answer a well-behaved server sends for one image of this size: the
    largest PNG of it (RGBA, incompressible: 4 bytes a pixel, a filter byte a row, zlib's
    and the chunks' overhead) as base64, and 1 MB for the answer's other fields."""
    pixels = params.width * params.height
    png = pixels * 4 + params.height + pixels * 4 // 100 + 64 * 1024
    return 4 * -(-png // 3) + MIB


class ImageGenerator(Protocol):
    def generate(
        self,
        endpoint: Endpoint,
        task: Task,
        *,
        timeout_seconds: float,
        hold: MemoryHold | None = None,
        watch: CallWatch = NO_WATCH,
    ) -> bytes:
        """Return PNG bytes, or raise RetryableGpuError / PermanentGpuError. With `hold`,
        the answer's memory is reserved from it as the answer arrives, and the PNG's
        bytes stay held when it returns (the caller releases them once stored). A
        protocol that reports steps passes them to `watch`; one that can stop a job stops
        it when `watch` says the task was canceled, and raises GpuCanceled."""
        ...


class _OpenAIImage(BaseModel):
    b64_json: str


class _OpenAIImagesResponse(BaseModel):
    data: list[_OpenAIImage]


def _post(
    session: requests.Session,
    endpoint: Endpoint,
    path: str,
    body: dict[str, object],
    *,
    timeout: float,
    credentials: GpuCredentials,
    params: ImageParams,
    hold: MemoryHold | None,
    method: str = "POST",
) -> requests.Response:
    url = f"{endpoint.url.rstrip('/')}{path}"
    limit = image_answer_limit(params)
    reserve = hold.reserver(limit=limit, factor=IMAGE_ANSWER_IN_MEMORY) if hold else None
    try:
        return credentials.send(
            endpoint,
            lambda headers: post_within(
                session,
                url,
                seconds=timeout,
                connect_seconds=CONNECT_TIMEOUT_SECONDS,
                max_bytes=limit,
                on_answer=reserve,
                method=method,
                json=body,
                headers=dict(headers) | IDENTITY,
            ),
        )
    except AnswerTooLarge as error:  # more than this dispatcher can hold: so on any GPU
        raise PermanentGpuError(f"endpoint {endpoint.endpoint_id}: {error}") from error
    except AnswerOverLimit as error:  # more than any PNG of that size: a broken server
        raise RetryableGpuError(f"endpoint {endpoint.endpoint_id} sent {error}") from error
    except requests.ConnectTimeout as error:  # the request never reached the GPU
        raise RetryableGpuError(
            f"endpoint {endpoint.endpoint_id} unreachable: {type(error).__name__}"
        ) from error
    except requests.Timeout as error:
        raise GpuTimeout(
            f"endpoint {endpoint.endpoint_id} timed out after {timeout:.0f}s"
        ) from error
    except requests.RequestException as error:
        raise RetryableGpuError(
            f"endpoint {endpoint.endpoint_id} unreachable: {type(error).__name__}"
        ) from error


class OpenAIImageClient:
    """OpenAI-compatible `POST /v1/images/generations` with `response_format=b64_json`."""

    def __init__(
        self,
        session: requests.Session | None = None,
        credentials: GpuCredentials | None = None,
    ) -> None:
        self._session = session or requests.Session()
        self._credentials = credentials or GpuCredentials()

    def generate(
        self,
        endpoint: Endpoint,
        task: Task,
        *,
        timeout_seconds: float,
        hold: MemoryHold | None = None,
        watch: CallWatch = NO_WATCH,
    ) -> bytes:
        params = task.params
        body: dict[str, object] = {
            "prompt": task.prompt,
            "n": 1,
            "size": f"{params.width}x{params.height}",
            "response_format": "b64_json",
            "steps": params.steps,
        }
        if task.negative_prompt:
            body["negative_prompt"] = task.negative_prompt
        if params.seed is not None:
            body["seed"] = params.seed
        response = _post(
            self._session,
            endpoint,
            "/v1/images/generations",
            body,
            timeout=timeout_seconds,
            credentials=self._credentials,
            params=params,
            hold=hold,
        )
        png = decode_png(endpoint, response)
        if hold is not None:
            hold.keep_only(len(png))
        return png


class _A1111Response(BaseModel):
    images: list[str]


class A1111ImageClient:
    """AUTOMATIC1111-style `POST /sdapi/v1/txt2img` (also Forge, SD.Next)."""

    def __init__(
        self,
        session: requests.Session | None = None,
        credentials: GpuCredentials | None = None,
    ) -> None:
        self._session = session or requests.Session()
        self._credentials = credentials or GpuCredentials()

    def generate(
        self,
        endpoint: Endpoint,
        task: Task,
        *,
        timeout_seconds: float,
        hold: MemoryHold | None = None,
        watch: CallWatch = NO_WATCH,
    ) -> bytes:
        params = task.params
        body: dict[str, object] = {
            "prompt": task.prompt,
            "negative_prompt": task.negative_prompt or "",
            "width": params.width,
            "height": params.height,
            "steps": params.steps,
            "seed": -1 if params.seed is None else params.seed,  # -1: A1111's "random"
            "batch_size": 1,
            "n_iter": 1,
        }
        response = _post(
            self._session,
            endpoint,
            "/sdapi/v1/txt2img",
            body,
            timeout=timeout_seconds,
            credentials=self._credentials,
            params=params,
            hold=hold,
        )
        _raise_for_status(endpoint, response)
        try:
            parsed = _A1111Response.model_validate_json(response.content)
            png = base64.b64decode(parsed.images[0], validate=True)
        except (ValidationError, IndexError, binascii.Error, ValueError):
            raise PermanentGpuError(
                f"endpoint {endpoint.endpoint_id} returned an unreadable image response"
            ) from None
        if hold is not None:
            hold.keep_only(len(png))
        return _check_png(endpoint, png)


def image_generators(
    session: requests.Session | None = None,
    credentials: GpuCredentials | None = None,
) -> dict[EndpointProtocol, ImageGenerator]:
    """One adapter per wire protocol, sharing a connection pool and the credentials."""
    # Imported here: the protocol modules build on this one's shared pieces (_post, ...).
    from gpuqueue.gpu.cog_client import CogImageClient  # noqa: PLC0415

    session = session or requests.Session()
    credentials = credentials or GpuCredentials()
    return {
        EndpointProtocol.OPENAI: OpenAIImageClient(session, credentials),
        EndpointProtocol.A1111: A1111ImageClient(session, credentials),
        EndpointProtocol.COG: CogImageClient(session, credentials),
    }


def _raise_for_status(endpoint: Endpoint, response: requests.Response) -> None:
    status = response.status_code
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise RetryableGpuError(f"endpoint {endpoint.endpoint_id} answered HTTP {status}")
    if status >= 400:
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} rejected the request: HTTP {status} "
            f"{response.text[:200]}"
        )


def _check_png(endpoint: Endpoint, png: bytes) -> bytes:
    if not png.startswith(PNG_MAGIC):
        raise PermanentGpuError(f"endpoint {endpoint.endpoint_id} returned data that is not a PNG")
    return png


def decode_png(endpoint: Endpoint, response: requests.Response) -> bytes:
    """An OpenAI images response -> PNG bytes, or the error it amounts to."""
    _raise_for_status(endpoint, response)
    try:
        parsed = _OpenAIImagesResponse.model_validate_json(response.content)
        png = base64.b64decode(parsed.data[0].b64_json, validate=True)
    except (ValidationError, IndexError, binascii.Error, ValueError):
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} returned an unreadable image response"
        ) from None
    return _check_png(endpoint, png)
