"""The `cog` adapter without a server: what it sends, how it reads Cog's answers and health,
and the progress it finds in a prediction's logs. (tests/integration/test_cog_server.py runs
it against the real Cog server.)"""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any, cast

import pytest
import requests
from urllib3 import HTTPResponse

from gpuqueue.errors import GpuCanceled, PermanentGpuError, RetryableGpuError
from gpuqueue.fleet.health_check import HEALTH_PROBES
from gpuqueue.gpu.cog_client import (
    CogImageClient,
    CogInputNames,
    cog_input,
    health_problem,
    parse_progress,
    prediction_id,
    read_prediction,
)
from gpuqueue.models import Endpoint, EndpointProtocol, ImageParams, Task, TaskKind, TaskStatus

ENDPOINT = Endpoint(
    endpoint_id="cog-a",
    url="http://cog-a:5000/",
    kind=TaskKind.IMAGE,
    protocol=EndpointProtocol.COG,
)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def task(*, seed: int | None = None, negative_prompt: str | None = None, attempt: int = 1) -> Task:
    return Task(
        task_id="9b2f1c3e-4d5a-4b6c-8d7e-0f1a2b3c4d5e",
        user_id="user-1",
        status=TaskStatus.RUNNING,
        prompt="a red fox in snow",
        negative_prompt=negative_prompt,
        params=ImageParams(width=640, height=480, steps=20, seed=seed),
        created_at="2026-01-27T10:00:00.000000Z",
        updated_at="2026-01-27T10:00:00.000000Z",
        attempt=attempt,
    )


def answer(status: int, body: bytes | dict[str, Any]) -> requests.Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    result = requests.Response()
    result.status_code = status
    result.raw = HTTPResponse(body=io.BytesIO(data), status=status, preload_content=False)
    result.encoding = "utf-8"
    return result


def read(status: int, body: bytes | dict[str, Any]) -> bytes:
    response = answer(status, body)
    response._content = response.raw.read()
    return read_prediction(ENDPOINT, response)


# --- the input ------------------------------------------------------------------------------


def test_the_input_uses_the_names_stable_diffusion_cog_models_use() -> None:
    assert cog_input(task(seed=7, negative_prompt="blurry")) == {
        "prompt": "a red fox in snow",
        "negative_prompt": "blurry",
        "width": 640,
        "height": 480,
        "num_inference_steps": 20,
        "seed": 7,
    }


def test_no_seed_and_no_negative_prompt_are_left_out_for_the_model_to_choose() -> None:
    assert set(cog_input(task())) == {"prompt", "width", "height", "num_inference_steps"}


def test_a_model_that_names_its_inputs_otherwise_gets_them_under_its_names() -> None:
    names = CogInputNames(steps="steps", prompt="text")

    sent = cog_input(task(), names)

    assert sent["steps"] == 20
    assert sent["text"] == "a red fox in snow"


def test_the_prediction_id_is_the_tasks_attempt_in_url_safe_characters() -> None:
    first, retry = prediction_id(task(attempt=1)), prediction_id(task(attempt=2))

    assert first == "9b2f1c3e-4d5a-4b6c-8d7e-0f1a2b3c4d5e-a1"
    assert retry != first
    odd = task().model_copy(update={"task_id": "a/b c?d"})
    assert prediction_id(odd) == "a-b-c-d-a1"


# --- progress from logs ---------------------------------------------------------------------

# As coglet 0.23.1 captured a tqdm bar on stderr (docs/gpu-servers.md, "Progress from Cog").
TQDM_LOGS = (
    "\r  0%|          | 0/6 [00:00<?, ?it/s]"
    "\r 17%|█▋        | 1/6 [00:00<00:01,  3.33it/s]"
    "\r 33%|███▎      | 2/6 [00:00<00:01,  3.33it/s]"
)


@pytest.mark.parametrize(
    ("logs", "expected"),
    [
        pytest.param(TQDM_LOGS, (2, 6), id="tqdm-bar-mid-way"),
        pytest.param(
            TQDM_LOGS + "\r100%|██████████| 6/6 [00:01<00:00,  3.32it/s]\n", (6, 6), id="tqdm-done"
        ),
        pytest.param("Using seed: 4\nstep 1/8\nstep 2/8\nstep 3/8\n", (3, 8), id="step-lines"),
        pytest.param(
            TQDM_LOGS + "\r100%|██████████| 6/6 [00:01<00:00]\n\r  0%|   | 0/3 [00:00<?, ?it/s]",
            (0, 3),
            id="second-bar-starts-over",
        ),
        pytest.param("Using seed: 4\nloading weights\n", None, id="no-count"),
        pytest.param("", None, id="empty"),
        pytest.param("copied 3/0 [files]", None, id="zero-steps-ignored"),
    ],
)
def test_progress_is_the_latest_count_in_the_logs(
    logs: str, expected: tuple[int, int] | None
) -> None:
    assert parse_progress(logs) == expected


# --- the answer -----------------------------------------------------------------------------


def test_a_succeeded_prediction_gives_its_png() -> None:
    body = {"id": "p", "logs": "", "metrics": {}, "output": DATA_URL, "status": "succeeded"}

    assert read(200, body) == PNG


def test_an_output_list_gives_its_first_png() -> None:
    assert read(200, {"status": "succeeded", "output": [DATA_URL, "data:x"]}) == PNG


@pytest.mark.parametrize(
    "output",
    [
        pytest.param(None, id="none"),
        pytest.param([], id="empty-list"),
        pytest.param("https://bucket/out.png", id="uploaded-url"),
        pytest.param("data:image/png;base64,@@@not base64", id="bad-base64"),
        pytest.param("data:text/plain;base64," + base64.b64encode(b"hi").decode(), id="not-png"),
    ],
)
def test_a_succeeded_prediction_without_a_readable_png_is_permanent(output: object) -> None:
    with pytest.raises(PermanentGpuError, match="cog-a"):
        read(200, {"status": "succeeded", "output": output})


def test_a_failed_prediction_is_permanent_with_the_models_error() -> None:
    body = {
        "error": "Prediction failed: Prediction failed: ValueError: boom at step 2",
        "id": "p1",
        "logs": "",
        "status": "failed",
    }

    with pytest.raises(PermanentGpuError, match="boom at step 2"):
        read(200, body)


def test_a_model_out_of_gpu_memory_is_worth_retrying() -> None:
    body = {"status": "failed", "error": "torch.OutOfMemoryError: CUDA out of memory."}

    with pytest.raises(RetryableGpuError, match="out of memory"):
        read(200, body)


def test_a_prediction_the_server_canceled_unasked_is_worth_retrying() -> None:
    with pytest.raises(RetryableGpuError, match="canceled"):
        read(200, {"id": "p", "status": "canceled"})


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (409, {"error": "At capacity - all prediction slots busy", "status": "failed"}),
        (503, {"error": "Setup has not finished yet.", "status": "failed"}),
        (500, b"internal"),
        (429, {}),
    ],
)
def test_a_busy_or_unready_server_is_worth_retrying(status: int, body: Any) -> None:
    with pytest.raises(RetryableGpuError, match=str(status)):
        read(status, body)


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_refused_request_is_permanent_with_what_cog_said(status: int) -> None:
    with pytest.raises(PermanentGpuError, match=f"{status}.*width must be"):
        read(status, {"error": "width must be a multiple of 8"})


@pytest.mark.parametrize("body", [b"<html>", {"id": "p"}])
def test_an_unreadable_prediction_is_permanent(body: Any) -> None:
    with pytest.raises(PermanentGpuError, match="unreadable"):
        read(200, body)


# --- health ---------------------------------------------------------------------------------


def health(status: int, body: dict[str, Any] | bytes) -> str | None:
    response = answer(status, body)
    response._content = response.raw.read()
    return health_problem(response)


def test_cog_endpoints_are_probed_at_health_check() -> None:
    assert HEALTH_PROBES[EndpointProtocol.COG].path == "/health-check"
    assert HEALTH_PROBES[EndpointProtocol.COG].judge is health_problem


@pytest.mark.parametrize("state", ["READY", "BUSY"])
def test_a_ready_or_busy_cog_server_is_healthy(state: str) -> None:
    assert health(200, {"status": state, "setup": {"status": "succeeded"}}) is None


def test_a_starting_cog_server_is_not_healthy_yet() -> None:
    assert health(200, {"status": "STARTING", "setup": {"status": "starting"}}) == (
        "Cog server starting (setup running)"
    )


def test_a_failed_setup_is_unhealthy_with_the_state_and_its_last_log_line() -> None:
    body = {
        "status": "SETUP_FAILED",
        "setup": {"status": "failed", "logs": "loading\nworker setup failed: no weights"},
    }

    assert health(200, body) == "Cog server SETUP_FAILED: worker setup failed: no weights"


@pytest.mark.parametrize("state", ["DEFUNCT", "UNHEALTHY", "SOMETHING_NEW"])
def test_any_other_state_is_unhealthy_naming_it(state: str) -> None:
    problem = health(200, {"status": state})

    assert problem is not None
    assert state in problem


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (502, b"bad gateway", "HTTP 502"),
        (200, b"<html>", "without a Cog status"),
        (200, {"ok": True}, "without a Cog status"),
    ],
)
def test_a_health_answer_that_is_not_cogs_is_unhealthy(
    status: int, body: Any, expected: str
) -> None:
    problem = health(status, body)

    assert problem is not None
    assert expected in problem


# --- the call -------------------------------------------------------------------------------


class FakeCog:
    """Records each request; PUT answers `answer` (after `release` is set, if given)."""

    def __init__(self, answer: requests.Response, release: threading.Event | None = None) -> None:
        self.answer = answer
        self.release = release
        self.calls: list[tuple[str, str, Any]] = []

    def put(self, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append(("PUT", url, kwargs.get("json")))
        if self.release is not None:
            self.release.wait(5)
        return self.answer

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append(("POST", url, kwargs.get("json")))
        if self.release is not None:
            self.release.set()
        return answer(200, b"{}")


class CancelingWatch:
    def __init__(self, *, cancel: bool) -> None:
        self.cancel = cancel
        self.jobs: list[str] = []

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        raise AssertionError("sync mode reports no progress")

    def job_started(self, job_id: str) -> None:
        self.jobs.append(job_id)

    def wait_cancel(self, seconds: float) -> bool:
        if self.cancel:
            return True
        threading.Event().wait(min(seconds, 0.01))
        return False


def test_generate_puts_the_prediction_under_the_tasks_id_and_returns_its_png() -> None:
    session = FakeCog(answer(200, {"id": "x", "status": "succeeded", "output": DATA_URL}))
    watch = CancelingWatch(cancel=False)
    client = CogImageClient(cast(requests.Session, session))

    png = client.generate(ENDPOINT, task(seed=3), timeout_seconds=30, watch=watch)

    assert png == PNG
    job = prediction_id(task(seed=3))
    assert watch.jobs == [job]
    assert session.calls == [
        ("PUT", f"http://cog-a:5000/predictions/{job}", {"input": cog_input(task(seed=3))})
    ]


def test_a_cancel_while_it_runs_cancels_the_prediction_by_id_and_raises_gpu_canceled() -> None:
    canceled = answer(200, {"id": "x", "status": "canceled", "logs": ""})
    session = FakeCog(canceled, release=threading.Event())
    client = CogImageClient(cast(requests.Session, session))

    with pytest.raises(GpuCanceled):
        client.generate(ENDPOINT, task(), timeout_seconds=30, watch=CancelingWatch(cancel=True))

    job = prediction_id(task())
    assert ("POST", f"http://cog-a:5000/predictions/{job}/cancel", None) in session.calls
