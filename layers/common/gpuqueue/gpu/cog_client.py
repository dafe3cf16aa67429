"""The `cog` protocol: a model packaged with Cog (Replicate's container format), served by
Cog's own HTTP server (coglet 0.23.1; docs/gpu-servers.md section 2 has the wire verbatim).

Synchronous mode: `PUT /predictions/{id}` without `Prefer: respond-async` blocks until the
prediction ends and answers with it. The id is ours (`prediction_id`: the task and its
attempt), so a cancel can name the prediction from another thread while the PUT blocks:
`POST /predictions/{id}/cancel`, after which Cog answers the PUT with `status: canceled`.
A caller that hangs up (our call deadline) also makes Cog cancel: a timed-out call leaves
the GPU free.

Cog answers a prediction that ran with HTTP 200 whatever its end, the end being in
`status`: `succeeded` (the PNG as a `data:` URL in `output`), `failed` (Cog's `error` holds
the model's exception), `canceled`. Its HTTP errors: 409 when its slots are all busy and
503 while setup has not finished, both retryable (another endpoint, or this one later);
422 is an input it refused.

Progress: none in this mode. Cog has no progress route: a prediction's steps exist only as
text in its `logs` (a diffusers model's tqdm bar on stderr), which Cog sends only with the
final answer, in webhooks, or to a re-PUT of the same id while it runs; GET is 405, and a
re-PUT of a prediction that just ended would start a new one. So this mode reports no
steps; the callback mode reads them from the webhooks' logs with `parse_progress`.

Inputs: Cog models name their inputs freely; `CogInputNames` holds the names most Stable
Diffusion Cog models use (prompt, negative_prompt, width, height, num_inference_steps,
seed). An unknown input makes a model without a schema fail, so only these are sent, and
no seed when the task has none (the model picks one; -1 is not Cog's "random").
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict, ValidationError

from gpuqueue.errors import PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.call_watch import NO_WATCH, CallWatch, watched
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.image_client import (
    CONNECT_TIMEOUT_SECONDS,
    RETRYABLE_STATUSES,
    _check_png,
    _post,
)
from gpuqueue.gpu.memory_budget import MemoryHold
from gpuqueue.models import Endpoint, Task

# Cog's answers to a call it could not take now: all slots busy (409), setup not finished
# or failed (503, also >= 500).
COG_RETRYABLE_STATUSES = RETRYABLE_STATUSES | {409}
CANCEL_TIMEOUT_SECONDS = 3.0
# Cog's error text for a model that ran out of GPU memory: another GPU (or this one once
# freed) may well serve the same request, so it is worth a retry.
OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|CUDA out of memory", re.IGNORECASE)
# A prediction id: the characters Cog's docs use and every URL path takes as they are.
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# tqdm's "  5/20 [00:01<00:03, ..." and a print's "step 5/20".
_TQDM_COUNT = re.compile(r"(\d+)/(\d+) \[")
_STEP_COUNT = re.compile(r"\bstep (\d+)\s*/\s*(\d+)", re.IGNORECASE)
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.ASCII)


class CogInputNames(BaseModel):
    """What the model calls each of our request's fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = "prompt"
    negative_prompt: str = "negative_prompt"
    width: str = "width"
    height: str = "height"
    steps: str = "num_inference_steps"
    seed: str = "seed"


DEFAULT_INPUT_NAMES = CogInputNames()


class _Prediction(BaseModel):
    """The fields of Cog's prediction answer the adapter reads (coglet sends no `input` or
    timestamps; `error` only on failure; `output` a string, or a list of them)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    status: str
    output: Any = None
    error: str | None = None
    logs: str | None = None


def prediction_id(task: Task) -> str:
    """The task's attempt as a Cog prediction id: the same for a redelivered message of the
    same attempt (a PUT of a running id returns it rather than starting a second run), a
    new one for the next attempt."""
    return f"{_ID_UNSAFE.sub('-', task.task_id)}-a{task.attempt}"


def cog_input(task: Task, names: CogInputNames = DEFAULT_INPUT_NAMES) -> dict[str, object]:
    """The prediction's `input`: the task's fields under the model's names."""
    params = task.params
    body: dict[str, object] = {
        names.prompt: task.prompt,
        names.width: params.width,
        names.height: params.height,
        names.steps: params.steps,
    }
    if task.negative_prompt:
        body[names.negative_prompt] = task.negative_prompt
    if params.seed is not None:
        body[names.seed] = params.seed
    return body


def parse_progress(logs: str) -> tuple[int, int] | None:
    """(step, steps) from a prediction's cumulative `logs`, None when they show no count.

    The latest count wins: tqdm redraws its bar with `\\r` (no newline until it closes), a
    model may print `step i/N` lines, and a second bar (a refiner) starts again from 0."""
    for segment in reversed(re.split(r"[\r\n]", logs)):
        match = _TQDM_COUNT.search(segment) or _STEP_COUNT.search(segment)
        if match is None:
            continue
        step, steps = int(match.group(1)), int(match.group(2))
        if steps > 0 and 0 <= step <= steps:
            return step, steps
    return None


def decode_output(endpoint: Endpoint, output: object) -> bytes:
    """A succeeded prediction's `output` -> PNG bytes: a `data:` URL, or a list whose first
    item is one (a model returning `list[Path]`)."""
    if isinstance(output, list) and output:
        output = output[0]
    if not isinstance(output, str):
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} returned a prediction with no image output"
        )
    match = _DATA_URL.match(output)
    if match is None:
        # An http(s) URL: the server uploads outputs (--upload-url), which we do not ask for.
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} returned its output as {output[:40]!r}, "
            "not a data: URL (is the server uploading outputs?)"
        )
    try:
        png = base64.b64decode(output[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} returned an unreadable image output"
        ) from None
    return _check_png(endpoint, png)


def read_prediction(endpoint: Endpoint, response: requests.Response) -> bytes:
    """A sync prediction's answer -> PNG bytes, or the error it amounts to. `canceled` is
    retryable here: nobody asked (a cancel we asked for is raised as GpuCanceled by
    `watched` whatever the answer)."""
    status = response.status_code
    if status != 200:
        raise _http_error(endpoint, response)
    try:
        prediction = _Prediction.model_validate_json(response.content)
    except ValidationError:
        raise PermanentGpuError(
            f"endpoint {endpoint.endpoint_id} returned an unreadable prediction"
        ) from None
    where = f"endpoint {endpoint.endpoint_id} prediction {prediction.id}"
    if prediction.status == "succeeded":
        return decode_output(endpoint, prediction.output)
    if prediction.status == "failed":
        error = prediction.error or "no error given"
        if OUT_OF_MEMORY.search(error):
            raise RetryableGpuError(f"{where} failed: {error[:300]}")
        raise PermanentGpuError(f"{where} failed: {error[:300]}")
    if prediction.status == "canceled":
        raise RetryableGpuError(f"{where} was canceled by the server")
    raise RetryableGpuError(f"{where} ended {prediction.status!r}, not succeeded")


def _http_error(endpoint: Endpoint, response: requests.Response) -> Exception:
    status = response.status_code
    try:
        said = str(response.json().get("error") or "")
    except (ValueError, AttributeError):
        said = response.text
    said = said[:200]
    if status >= 500 or status in COG_RETRYABLE_STATUSES:
        return RetryableGpuError(
            f"endpoint {endpoint.endpoint_id} answered HTTP {status}: {said}".rstrip(": ")
        )
    return PermanentGpuError(
        f"endpoint {endpoint.endpoint_id} rejected the request: HTTP {status} {said}".rstrip()
    )


def health_problem(response: requests.Response) -> str | None:
    """Cog's `GET /health-check` (always HTTP 200; the state in `status`) -> None when it can
    take work, else why not.

    BUSY is healthy: the server is up and its slot is in use, most often by our own call
    (the slot lease keeps us at its capacity); calling that unhealthy would count every
    running call as a failure against the circuit. A call that finds it busy anyway gets a
    409, retried elsewhere. STARTING (setup running), SETUP_FAILED, DEFUNCT and UNHEALTHY
    keep work away until it says READY."""
    if response.status_code != 200:
        return f"health check answered HTTP {response.status_code}"
    try:
        body = response.json()
        state = str(body["status"])
    except (ValueError, KeyError, TypeError):
        return "health check answered without a Cog status"
    if state in {"READY", "BUSY"}:
        return None
    if state == "STARTING":
        return "Cog server starting (setup running)"
    setup = body.get("setup") if isinstance(body.get("setup"), dict) else {}
    detail = body.get("user_healthcheck_error") or (setup or {}).get("logs") or ""
    last_line = str(detail).strip().splitlines()[-1:] or [""]
    return f"Cog server {state}: {last_line[0][:200]}".rstrip(": ")


class CogImageClient:
    """Cog's `PUT /predictions/{id}`, synchronous; cancel by id while it runs."""

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

    def generate(
        self,
        endpoint: Endpoint,
        task: Task,
        *,
        timeout_seconds: float,
        hold: MemoryHold | None = None,
        watch: CallWatch = NO_WATCH,
    ) -> bytes:
        job = prediction_id(task)
        watch.job_started(job)

        def predict() -> requests.Response:
            return _post(
                self._session,
                endpoint,
                f"/predictions/{job}",
                {"input": cog_input(task, self._names)},
                timeout=timeout_seconds,
                credentials=self._credentials,
                params=task.params,
                hold=hold,
                method="PUT",
            )

        def interrupt() -> None:
            self.cancel(endpoint, job)

        response = watched(predict, watch=watch, interrupt=interrupt)
        png = read_prediction(endpoint, response)
        if hold is not None:
            hold.keep_only(len(png))
        return png

    def cancel(self, endpoint: Endpoint, job: str) -> bool:
        """Ask Cog to stop prediction `job`: True if it was running (200), False if Cog no
        longer knows it (404: it ended already)."""
        url = f"{endpoint.url.rstrip('/')}/predictions/{job}/cancel"
        response = self._credentials.send(
            endpoint,
            lambda headers: self._session.post(
                url,
                headers=dict(headers),
                timeout=(CONNECT_TIMEOUT_SECONDS, CANCEL_TIMEOUT_SECONDS),
            ),
        )
        return response.status_code == 200
