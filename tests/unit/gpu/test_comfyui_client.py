"""The ComfyUI adapter against a scripted fake server (its HTTP routes and its ws): the
answers the stand-in never gives. Malformed /prompt answers, a socket that drops midway,
history that lags its last event or never comes, cancels the server will not confirm or
cannot be reached for, and each transport failure mapped to retryable, permanent or timeout.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import requests
from urllib3 import HTTPResponse
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from gpuqueue.errors import GpuCanceled, GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.fleet.endpoint_specs import default_workflow
from gpuqueue.gpu import comfyui_client
from gpuqueue.gpu.comfyui_client import ComfyUIImageClient
from gpuqueue.gpu.image_client import PNG_MAGIC, image_answer_limit
from gpuqueue.gpu.memory_budget import MIB, MemoryBudget
from gpuqueue.models import (
    ComfyWorkflow,
    Endpoint,
    EndpointProtocol,
    ImageParams,
    Task,
    TaskKind,
    TaskStatus,
)

WORKFLOW = ComfyWorkflow.model_validate(default_workflow("sd15.safetensors"))
ENDPOINT = Endpoint(
    endpoint_id="comfy-1",
    url="http://comfy-1:8188/",
    kind=TaskKind.IMAGE,
    protocol=EndpointProtocol.COMFYUI,
    workflow=WORKFLOW,
)
PROMPT_ID = "p-1"
PNG = PNG_MAGIC + b"\x00\x00\x00\rIHDR" + bytes(32)
TASK = Task(
    task_id="task-1",
    user_id="u-1",
    status=TaskStatus.RUNNING,
    prompt="a lighthouse at dusk",
    params=ImageParams(width=320, height=256, steps=10, seed=5),
    created_at="2026-01-27T10:00:00.000000Z",
    updated_at="2026-01-27T10:00:00.000000Z",
)


@dataclass(frozen=True)
class Canned:
    """One scripted HTTP answer; a fresh `requests.Response` each time it is served."""

    status: int
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> requests.Response:
        """As `requests` gives it with `stream=True`: the body not read yet."""
        body = self.body
        data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        result = requests.Response()
        result.status_code = self.status
        result.raw = HTTPResponse(body=io.BytesIO(data), status=self.status, preload_content=False)
        result.headers.update(self.headers)
        return result


Answer = Canned | Exception
Script = Answer | Callable[[dict[str, Any]], Answer]


def history_entry(status_str: str = "success", *messages: list[Any]) -> dict[str, Any]:
    return {
        "prompt": [1, PROMPT_ID, {}, {}, ["9"]],
        "outputs": {
            "9": {"images": [{"filename": "out_1.png", "subfolder": "", "type": "output"}]}
        },
        "status": {
            "status_str": status_str,
            "completed": status_str == "success",
            "messages": list(messages),
        },
    }


def history(entry: dict[str, Any] | None = None) -> Canned:
    """GET /history/{id}: `{}` until the prompt has an entry."""
    return Canned(200, {} if entry is None else {PROMPT_ID: entry})


RUNNING = Canned(200, {"queue_running": [[1, PROMPT_ID, {}, {}, ["9"]]], "queue_pending": []})


class FakeComfy:
    """`requests.Session`'s get/post for a ComfyUI that answers each route from a script:
    a route's answers are used in turn, its last one from then on."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Script]] = {
            ("POST", "/prompt"): [Canned(200, {"prompt_id": PROMPT_ID, "node_errors": {}})],
            ("GET", f"/history/{PROMPT_ID}"): [history(history_entry())],
            ("GET", "/view"): [Canned(200, PNG)],
            ("GET", "/queue"): [RUNNING],
            ("POST", "/queue"): [Canned(200)],
            ("POST", "/interrupt"): [Canned(200)],
        }
        self.calls: list[tuple[str, str, Any]] = []

    def answer(self, method: str, path: str, *script: Script) -> None:
        self.routes[(method, path)] = list(script)

    def sent(self, method: str, path: str) -> list[Any]:
        """The JSON bodies of the calls to one route, in order."""
        return [body for m, p, body in self.calls if (m, p) == (method, path)]

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._serve("GET", url, kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._serve("POST", url, kwargs)

    def _serve(self, method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
        path = urlsplit(url).path
        self.calls.append((method, path, kwargs.get("json")))
        script = self.routes[(method, path)]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if not isinstance(answer, Canned | Exception):
            answer = answer(kwargs)
        if isinstance(answer, Exception):
            raise answer
        return answer.response()


@dataclass
class FakeSocket:
    """The prompt's ws: scripted messages (or a ConnectionClosed), then quiet."""

    script: list[str | bytes | Exception] = field(default_factory=list)
    quiet: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def recv(self, timeout: float | None = None) -> str | bytes:
        if self.script:
            message = self.script.pop(0)
            if isinstance(message, Exception):
                raise message
            return message
        self.quiet.wait(timeout)  # never set: nothing more comes
        raise TimeoutError


def event(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": {"prompt_id": PROMPT_ID, **data}})


def progress(step: int, steps: int = 10) -> str:
    return event("progress", value=step, max=steps, node="3")


def dropped() -> ConnectionClosed:
    return ConnectionClosed(Close(1006, "gone"), None)


@pytest.fixture
def comfy() -> FakeComfy:
    return FakeComfy()


@pytest.fixture
def no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("ws refused")

    monkeypatch.setattr("websockets.sync.client.connect", refuse)


@pytest.fixture
def socket_of(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeSocket]:
    def install(*script: str | bytes | Exception) -> FakeSocket:
        ws = FakeSocket(list(script))
        monkeypatch.setattr("websockets.sync.client.connect", lambda *a, **k: ws)
        return ws

    return install


class Watch:
    """A CallWatch whose cancel is set from the start or not at all."""

    def __init__(self, *, cancel: bool = False) -> None:
        self.steps: list[tuple[int, int]] = []
        self.cancel = cancel

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        self.steps.append((step, steps))

    def job_started(self, job_id: str) -> None:
        return None

    def wait_cancel(self, seconds: float) -> bool:
        return self.cancel


def generate(
    comfy: FakeComfy,
    watch: Watch | None = None,
    *,
    endpoint: Endpoint = ENDPOINT,
    timeout_seconds: float = 10.0,
    **kwargs: Any,
) -> bytes:
    client = ComfyUIImageClient(cast(requests.Session, comfy), poll_seconds=0.01)
    return client.generate(
        endpoint, TASK, timeout_seconds=timeout_seconds, watch=watch or Watch(), **kwargs
    )


# --- the prompt ------------------------------------------------------------------------------


def test_an_endpoint_without_a_workflow_is_permanent_and_nothing_is_sent(comfy: FakeComfy) -> None:
    bare = ENDPOINT.model_copy(update={"workflow": None})

    with pytest.raises(PermanentGpuError, match="comfy-1 has no comfyui workflow"):
        generate(comfy, endpoint=bare)
    assert comfy.calls == []


@pytest.mark.parametrize(
    "answer",
    [Canned(200, b"<html>proxy page</html>"), Canned(200, {"number": 3, "node_errors": {}})],
    ids=["not-json", "no-prompt-id"],
)
def test_a_prompt_answer_without_a_prompt_id_is_retryable(
    comfy: FakeComfy, no_socket: None, answer: Canned
) -> None:
    comfy.answer("POST", "/prompt", answer)

    with pytest.raises(RetryableGpuError, match="queued no prompt"):
        generate(comfy)
    assert comfy.sent("GET", f"/history/{PROMPT_ID}") == []


def test_a_queued_prompt_whose_output_node_failed_validation_is_permanent(
    comfy: FakeComfy, no_socket: None
) -> None:
    """ComfyUI runs the outputs that validate and skips the others: ours would never come."""
    node_errors = {
        "9": {
            "errors": [{"message": "Required input is missing", "details": "images"}],
            "class_type": "SaveImage",
        }
    }
    comfy.answer(
        "POST", "/prompt", Canned(200, {"prompt_id": PROMPT_ID, "node_errors": node_errors})
    )

    with pytest.raises(
        PermanentGpuError, match=r"node 9 \(SaveImage\): Required input is missing images"
    ):
        generate(comfy)
    assert comfy.sent("GET", f"/history/{PROMPT_ID}") == []


@pytest.mark.parametrize(("status", "error"), [(503, RetryableGpuError), (429, RetryableGpuError)])
def test_a_busy_or_broken_server_refusing_the_prompt_is_retryable(
    comfy: FakeComfy, status: int, error: type[Exception]
) -> None:
    comfy.answer("POST", "/prompt", Canned(status, b"busy"))

    with pytest.raises(error, match=f"answered HTTP {status}"):
        generate(comfy)


# --- following it ----------------------------------------------------------------------------


def test_a_socket_that_drops_midway_is_followed_by_history_to_the_image(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket]
) -> None:
    """Noticed at the next poll, not at the next with-a-socket history check (10 s)."""
    socket_of(progress(1), b"\x00\x00\x00\x01preview", progress(2), dropped())
    comfy.answer("GET", f"/history/{PROMPT_ID}", history(), history(history_entry()))
    watch = Watch()
    started = time.monotonic()

    png = generate(comfy, watch)

    assert png == PNG
    assert time.monotonic() - started < comfyui_client.HISTORY_CHECK_SECONDS / 2
    assert watch.steps == [(1, 10), (2, 10)]  # the steps heard before the drop
    assert len(comfy.sent("GET", f"/history/{PROMPT_ID}")) >= 2


def test_history_written_just_after_the_success_event_is_waited_for(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket]
) -> None:
    """ComfyUI sends `execution_success` before it writes the prompt's history."""
    socket_of(progress(10), event("execution_success"))
    comfy.answer("GET", f"/history/{PROMPT_ID}", history(), history(), history(history_entry()))

    assert generate(comfy) == PNG
    assert len(comfy.sent("GET", f"/history/{PROMPT_ID}")) == 3


def test_no_history_after_the_end_is_retryable(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(comfyui_client, "HISTORY_SETTLE_SECONDS", 0.2)
    socket_of(event("execution_success"))
    comfy.answer("GET", f"/history/{PROMPT_ID}", history())

    with pytest.raises(RetryableGpuError, match="has no history for prompt p-1"):
        generate(comfy)
    assert comfy.sent("GET", "/view") == []


def test_an_old_servers_end_event_is_judged_by_the_history_it_left(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket]
) -> None:
    """Older servers end a prompt with `executing node: null`, failed or not."""
    socket_of(event("executing", node=None))
    failure = [
        "execution_error",
        {"node_id": "8", "node_type": "VAEDecode", "exception_message": "CUDA error"},
    ]
    comfy.answer("GET", f"/history/{PROMPT_ID}", history(history_entry("error", failure)))

    with pytest.raises(
        PermanentGpuError, match=r"failed prompt p-1: error in node 8 \(VAEDecode\): CUDA error"
    ):
        generate(comfy)
    assert comfy.sent("GET", "/view") == []


@pytest.mark.parametrize(
    "outputs",
    [{}, {"9": {"latents": []}}, {"9": {"images": []}}, {"9": {"images": ["out_1.png"]}}],
    ids=["no-output", "no-images", "empty-images", "no-filename"],
)
def test_a_prompt_that_left_no_image_at_the_output_node_is_permanent(
    comfy: FakeComfy, no_socket: None, outputs: dict[str, Any]
) -> None:
    entry = history_entry() | {"outputs": outputs}
    comfy.answer("GET", f"/history/{PROMPT_ID}", history(entry))

    with pytest.raises(PermanentGpuError, match="left no image at output node 9"):
        generate(comfy)


# --- the image -------------------------------------------------------------------------------


def test_the_image_keeps_only_its_own_size_of_the_memory_hold(
    comfy: FakeComfy, no_socket: None
) -> None:
    hold = MemoryBudget(64 * MIB).hold()

    assert generate(comfy, hold=hold) == PNG
    assert hold.held == len(PNG)


def test_an_image_that_is_not_a_png_is_permanent(comfy: FakeComfy, no_socket: None) -> None:
    comfy.answer("GET", "/view", Canned(200, b"GIF89a..."))

    with pytest.raises(PermanentGpuError, match="not a PNG"):
        generate(comfy)


def test_an_image_the_server_no_longer_has_is_permanent(comfy: FakeComfy, no_socket: None) -> None:
    comfy.answer("GET", "/view", Canned(404, b"404: Not Found"))

    with pytest.raises(PermanentGpuError, match="rejected the request: HTTP 404 404: Not Found"):
        generate(comfy)


def test_an_image_larger_than_any_of_its_size_is_retryable(
    comfy: FakeComfy, no_socket: None
) -> None:
    too_big = image_answer_limit(TASK.params) + 1
    comfy.answer("GET", "/view", Canned(200, PNG, {"Content-Length": str(too_big)}))

    with pytest.raises(RetryableGpuError, match=f"sent an answer of {too_big} bytes"):
        generate(comfy)


def test_an_image_larger_than_the_dispatchers_memory_is_permanent(
    comfy: FakeComfy, no_socket: None
) -> None:
    hold = MemoryBudget(MIB // 2).hold()
    comfy.answer("GET", "/view", Canned(200, PNG, {"Content-Length": str(MIB)}))

    with pytest.raises(PermanentGpuError, match="MemorySize"):
        generate(comfy, hold=hold)
    assert hold.held == 0


# --- transport failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (requests.ConnectTimeout(), "unreachable: ConnectTimeout"),
        (requests.ReadTimeout(), "did not answer POST /prompt"),
        (requests.ConnectionError(), "unreachable: ConnectionError"),
    ],
)
def test_a_prompt_the_server_does_not_take_in_time_is_retryable(
    comfy: FakeComfy, no_socket: None, error: Exception, message: str
) -> None:
    comfy.answer("POST", "/prompt", error)

    with pytest.raises(RetryableGpuError, match=message):
        generate(comfy)


class SteppedClock:
    """`time` for the adapter: `monotonic` moves only when told (or on `sleep`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_an_image_read_that_runs_past_the_deadline_is_a_timeout(
    comfy: FakeComfy, no_socket: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SteppedClock()
    monkeypatch.setattr(comfyui_client, "time", clock)

    def slow_view(kwargs: dict[str, Any]) -> Answer:
        clock.now += 31.0  # the whole call's 30 s went by on this read
        return requests.ReadTimeout()

    comfy.answer("GET", "/view", slow_view)

    with pytest.raises(GpuTimeout, match="timed out on GET /view"):
        generate(comfy, timeout_seconds=30.0)


# --- stopping it -----------------------------------------------------------------------------


def test_a_cancel_waits_for_the_server_to_say_it_stopped(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket]
) -> None:
    """Steps still come between the interrupt and its effect: only the end confirms it."""
    ws = socket_of(progress(4), progress(5), event("execution_interrupted"), progress(9))

    with pytest.raises(GpuCanceled):
        generate(comfy, Watch(cancel=True))

    assert comfy.sent("POST", "/interrupt") == [{"prompt_id": PROMPT_ID}]
    assert ws.script == [progress(9)]  # read up to the interruption, no further


def test_a_cancel_without_a_socket_is_confirmed_by_the_prompts_history(
    comfy: FakeComfy, no_socket: None
) -> None:
    interrupted = history_entry("error", ["execution_interrupted", {"prompt_id": PROMPT_ID}])
    comfy.answer("GET", f"/history/{PROMPT_ID}", history(), history(), history(interrupted))

    with pytest.raises(GpuCanceled):
        generate(comfy, Watch(cancel=True))

    assert comfy.sent("POST", "/interrupt") == [{"prompt_id": PROMPT_ID}]
    assert len(comfy.sent("GET", f"/history/{PROMPT_ID}")) == 3


def test_a_cancel_the_server_never_confirms_hands_the_slot_back_after_a_while(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(comfyui_client, "CANCEL_CONFIRM_SECONDS", 0.3)
    socket_of()
    started = time.monotonic()

    with pytest.raises(GpuCanceled):
        generate(comfy, Watch(cancel=True))

    assert 0.3 <= time.monotonic() - started < 2.0
    assert comfy.sent("POST", "/interrupt") == [{"prompt_id": PROMPT_ID}]


@pytest.mark.parametrize(
    "queue",
    [Canned(502, b"bad gateway"), requests.ConnectionError()],
    ids=["queue-502", "queue-unreachable"],
)
def test_a_cancel_that_cannot_read_the_queue_interrupts_the_prompt(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket], queue: Answer
) -> None:
    """Not knowing whether ours waits or runs, interrupting by its id is the safe stop."""
    socket_of(event("execution_interrupted"))
    comfy.answer("GET", "/queue", queue)

    with pytest.raises(GpuCanceled):
        generate(comfy, Watch(cancel=True))

    assert comfy.sent("POST", "/queue") == []
    assert comfy.sent("POST", "/interrupt") == [{"prompt_id": PROMPT_ID}]


def test_a_cancel_on_a_server_gone_unreachable_still_ends_canceled_at_once(
    comfy: FakeComfy, socket_of: Callable[..., FakeSocket]
) -> None:
    socket_of()
    comfy.answer("GET", "/queue", requests.ConnectionError())
    comfy.answer("POST", "/interrupt", requests.ConnectionError())
    started = time.monotonic()

    with pytest.raises(GpuCanceled):
        generate(comfy, Watch(cancel=True))

    assert time.monotonic() - started < comfyui_client.CANCEL_CONFIRM_SECONDS
    assert comfy.sent("POST", "/interrupt") == [{"prompt_id": PROMPT_ID}]
