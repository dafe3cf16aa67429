"""GPU protocol adapters. One adapter per wire protocol, behind one small interface."""

from __future__ import annotations

import base64
import binascii
from typing import Protocol

import requests
from pydantic import BaseModel, ValidationError

from gpuqueue.errors import PermanentGpuError, RetryableGpuError
from gpuqueue.models import Endpoint, Task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONNECT_TIMEOUT_SECONDS = 3.0
# Responses a GPU server gives when it is busy or sick, not when our request is wrong.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


class ImageGenerator(Protocol):
    def generate(self, endpoint: Endpoint, task: Task, *, timeout_seconds: float) -> bytes:
        """Return PNG bytes, or raise RetryableGpuError / PermanentGpuError."""
        ...


class _OpenAIImage(BaseModel):
    b64_json: str


class _OpenAIImagesResponse(BaseModel):
    data: list[_OpenAIImage]


class OpenAIImageClient:
    """OpenAI-compatible `POST /v1/images/generations` with `response_format=b64_json`."""

    def __init__(self, session: requests.Session | None = None) -> None:
        self._session = session or requests.Session()

    def generate(self, endpoint: Endpoint, task: Task, *, timeout_seconds: float) -> bytes:
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
        url = f"{endpoint.url.rstrip('/')}/v1/images/generations"
        connect = min(CONNECT_TIMEOUT_SECONDS, timeout_seconds)
        try:
            response = self._session.post(url, json=body, timeout=(connect, timeout_seconds))
        except requests.Timeout as error:
            raise RetryableGpuError(
                f"endpoint {endpoint.endpoint_id} timed out after {timeout_seconds:.0f}s"
            ) from error
        except requests.RequestException as error:
            raise RetryableGpuError(
                f"endpoint {endpoint.endpoint_id} unreachable: {type(error).__name__}"
            ) from error
        return decode_png(endpoint, response)


def decode_png(endpoint: Endpoint, response: requests.Response) -> bytes:
    status = response.status_code
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise RetryableGpuError(f"endpoint {endpoint.endpoint_id} answered HTTP {status}")
    if status >= 400:
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} rejected the request: HTTP {status} "
            f"{response.text[:200]}"
        )
    try:
        parsed = _OpenAIImagesResponse.model_validate_json(response.content)
        png = base64.b64decode(parsed.data[0].b64_json, validate=True)
    except (ValidationError, IndexError, binascii.Error, ValueError):
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} returned an unreadable image response"
        ) from None
    if not png.startswith(PNG_MAGIC):
        raise PermanentGpuError(f"endpoint {endpoint.endpoint_id} returned data that is not a PNG")
    return png
