"""Cog's asynchronous predictions, for callback mode: start one that reports by webhook,
cancel it, and read the webhook bodies it POSTs back.

Written against coglet 0.23.1 (docs/gpu-servers.md, Cog): `PUT /predictions/{id}` with
`Prefer: respond-async` answers 202 at once (409: its one slot is busy; 503: not set up);
every webhook body is the whole prediction so far (`id`, `status`, cumulative `logs`,
`output` once it succeeded, `error` once it failed), with no signature and no input.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import requests
from pydantic import BaseModel, ConfigDict, StringConstraints

from gpuqueue.errors import PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.cog_client import (
    COG_RETRYABLE_STATUSES,
    DEFAULT_INPUT_NAMES,
    CogImageClient,
    CogInputNames,
    cog_input,
    decode_output,
)
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.image_client import CONNECT_TIMEOUT_SECONDS, image_answer_limit
from gpuqueue.models import Endpoint, ImageParams, Task

# What Cog is asked to send: its start, its logs (progress, ~ every 0.5 s while they
# grow) and its end. Not `output`: it repeats the whole image as a list before `completed`.
WEBHOOK_EVENTS = ("start", "logs", "completed")
# `callback_progress: false`: one webhook a prediction (no progress; a cancel is seen at the end).
COMPLETED_ONLY = ("completed",)
# A Lambda behind API Gateway takes at most 6 MB of request (Lambda's synchronous payload
# limit, the event's envelope included): a `completed` webhook carries the PNG as base64.
CALLBACK_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024
# Starting a prediction answers at once; a server slower than this is sick.
ANSWER_TIMEOUT_SECONDS = 10.0


def fits_callback(params: ImageParams) -> bool:
    """Whether the largest answer a well-behaved server sends for this size (as the sync
    path bounds it, `image_answer_limit`: base64 of an incompressible PNG plus 1 MB for
    the rest, logs included) fits in one callback request."""
    return image_answer_limit(params) <= CALLBACK_PAYLOAD_LIMIT_BYTES


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


def png_of(endpoint: Endpoint, output: str | list[Any] | None, *, params: ImageParams) -> bytes:
    """The PNG in a succeeded prediction's `output`, no larger than any image of its size
    can be (checked before decoding). PermanentGpuError: none there."""
    first = output[0] if isinstance(output, list) and output else output
    if isinstance(first, str) and len(first) > image_answer_limit(params):
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} returned an image larger than its size allows"
        )
    return decode_output(endpoint, first)


class CogPredictions:
    """Starts and cancels Cog predictions, with the endpoint's credentials."""

    def __init__(
        self,
        session: requests.Session | None = None,
        credentials: GpuCredentials | None = None,
        *,
        input_names: CogInputNames = DEFAULT_INPUT_NAMES,
    ) -> None:
        self._session = session or requests.Session()
        self._credentials = credentials or GpuCredentials()
        self._names = input_names
        self._sync = CogImageClient(self._session, self._credentials, input_names=input_names)

    def start(self, endpoint: Endpoint, task: Task, *, prediction_id: str, webhook: str) -> None:
        """`PUT /predictions/{prediction_id}` answered 202: the server works on it now and
        reports to `webhook`. A PUT with our id: a repeat of the same start is the same
        prediction. Raises RetryableGpuError (busy, unreachable, 5xx) or PermanentGpuError
        (refused)."""
        body = {
            "input": cog_input(task, self._names),
            "webhook": webhook,
            "webhook_events_filter": list(
                WEBHOOK_EVENTS if endpoint.callback_progress else COMPLETED_ONLY
            ),
        }
        url = f"{endpoint.url.rstrip('/')}/predictions/{prediction_id}"
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
        return self._sync.cancel(endpoint, prediction_id)
