"""Cog's asynchronous predictions, for callback mode: start one that reports by webhook,
cancel it, and read the webhook bodies it POSTs back.

Written against coglet 0.23.1 (docs/gpu-servers.md, Cog): `PUT /predictions/{id}` with
`Prefer: respond-async` answers 202 at once (409: its one slot is busy; 503: not set up);
every webhook body is the whole prediction so far (`id`, `status`, cumulative `logs`,
`output` once it succeeded, `error` once it failed), with no signature and no input.
"""

from __future__ import annotations

import base64
import binascii
import re
from enum import StrEnum
from typing import Annotated, Any

import requests
from pydantic import BaseModel, ConfigDict, StringConstraints

from gpuqueue.errors import PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.image_client import (
    CONNECT_TIMEOUT_SECONDS,
    PNG_MAGIC,
    RETRYABLE_STATUSES,
    image_answer_limit,
)
from gpuqueue.models import Endpoint, ImageParams, Task

# What Cog is asked to send: its start, its logs (progress, ~ every 0.5 s while they
# grow) and its end. Not `output`: it repeats the whole image as a list before `completed`.
WEBHOOK_EVENTS = ("start", "logs", "completed")
# A Lambda behind API Gateway takes at most 6 MB of request (Lambda's synchronous payload
# limit, the event's envelope included): a `completed` webhook carries the PNG as base64.
CALLBACK_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024
# Starting or canceling a prediction answers at once; a server slower than this is sick.
ANSWER_TIMEOUT_SECONDS = 10.0
# Cog answers a second prediction on a busy slot 409 (it has no queue): busy, not wrong.
COG_RETRYABLE_STATUSES = RETRYABLE_STATUSES | {409}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)(?:;[\w=.+-]+)*;base64,", re.ASCII)


def fits_callback(params: ImageParams) -> bool:
    """Whether the largest answer a well-behaved server sends for this size (as the sync
    path bounds it, `image_answer_limit`) fits in one callback request."""
    return image_answer_limit(params) <= CALLBACK_PAYLOAD_LIMIT_BYTES


def prediction_input(task: Task) -> dict[str, Any]:
    """The task as a Cog predictor's inputs. Only the keys a text-to-image predictor is
    expected to take: without a schema Cog passes every key to `predict()`, and an unknown
    one fails it. A random seed is left out (Cog models draw their own)."""
    params = task.params
    body: dict[str, Any] = {
        "prompt": task.prompt,
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if task.negative_prompt:
        body["negative_prompt"] = task.negative_prompt
    return body


class CogStatus(StrEnum):
    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (CogStatus.SUCCEEDED, CogStatus.FAILED, CogStatus.CANCELED)


class CogWebhook(BaseModel):
    """One webhook body (fields Cog may add are ignored)."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    status: CogStatus
    logs: str | None = None
    # A `cog.Path` answer: a `data:` URL (a list of them for list outputs, and in `output`
    # events); an http(s) URL when the server uploads its files itself.
    output: str | list[Any] | None = None
    error: str | None = None


def png_of(output: str | list[Any] | None, *, max_bytes: int) -> bytes:
    """The PNG in a succeeded prediction's `output` (its first file). ValueError: none."""
    first = output[0] if isinstance(output, list) and output else output
    if not isinstance(first, str):
        raise ValueError("the prediction's output is not a file")
    match = _DATA_URL.match(first)
    if match is None:
        raise ValueError("the prediction's output is not a data: URL (an upload URL is not read)")
    encoded = first[match.end() :]
    if len(encoded) > 4 * -(-max_bytes // 3):
        raise ValueError("the prediction's image is larger than any of its size can be")
    try:
        png = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the prediction's output is not valid base64") from None
    if not png.startswith(PNG_MAGIC):
        raise ValueError("the prediction's output is not a PNG")
    return png


class CogPredictions:
    """Starts and cancels Cog predictions, with the endpoint's credentials."""

    def __init__(
        self, session: requests.Session | None = None, credentials: GpuCredentials | None = None
    ) -> None:
        self._session = session or requests.Session()
        self._credentials = credentials or GpuCredentials()

    def start(self, endpoint: Endpoint, task: Task, *, prediction_id: str, webhook: str) -> None:
        """`PUT /predictions/{prediction_id}` answered 202: the server works on it now and
        reports to `webhook`. A PUT, not a POST: with our id, a repeat of the same start
        is the same prediction, and a cancel needs no answer from this one. Raises
        RetryableGpuError (busy, unreachable, 5xx) or PermanentGpuError (refused)."""
        body = {
            "input": prediction_input(task),
            "webhook": webhook,
            "webhook_events_filter": list(WEBHOOK_EVENTS),
        }
        url = f"{endpoint.url}/predictions/{prediction_id}"
        try:
            response = self._credentials.send(
                endpoint,
                lambda auth: self._session.put(
                    url,
                    json=body,
                    headers={**auth, "Prefer": "respond-async"},
                    timeout=(CONNECT_TIMEOUT_SECONDS, ANSWER_TIMEOUT_SECONDS),
                ),
            )
        except requests.RequestException as error:
            raise RetryableGpuError(
                f"endpoint {endpoint.endpoint_id} unreachable: {type(error).__name__}"
            ) from None
        status = response.status_code
        if status in (200, 201, 202):
            return
        if status >= 500 or status in COG_RETRYABLE_STATUSES:
            raise RetryableGpuError(f"endpoint {endpoint.endpoint_id} answered HTTP {status}")
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} refused the prediction: HTTP {status} "
            f"{response.text[:200]}"
        )

    def cancel(self, endpoint: Endpoint, prediction_id: str) -> bool:
        """`POST /predictions/{id}/cancel`: True if it was running (its `completed` webhook,
        status canceled, follows); False if the server no longer knows it (it ended)."""
        url = f"{endpoint.url}/predictions/{prediction_id}/cancel"
        response = self._credentials.send(
            endpoint,
            lambda auth: self._session.post(
                url, headers=auth, timeout=(CONNECT_TIMEOUT_SECONDS, ANSWER_TIMEOUT_SECONDS)
            ),
        )
        return response.status_code == 200


_TQDM = re.compile(r"(\d+)/(\d+) \[")
_STEP_LINE = re.compile(r"(?i)\bstep\s+(\d+)\s*/\s*(\d+)")


def progress_of_logs(logs: str | None) -> tuple[int, int] | None:
    """Step and steps from Cog's cumulative logs: the last line (a tqdm bar redraws with
    `\\r`) that says `n/N [` (tqdm) or `step n/N`; None when no line does."""
    if not logs:
        return None
    for line in reversed(re.split(r"[\r\n]+", logs)):
        found = _TQDM.search(line) or _STEP_LINE.search(line)
        if found is not None:
            step, steps = int(found.group(1)), int(found.group(2))
            if steps > 0:
                return min(step, steps), steps
    return None
