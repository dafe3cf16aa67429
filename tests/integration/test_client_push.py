"""`--wait` over push: the API announces a WebSocket (`X-Push-Url`) and the client hears the
task's end there, polling only when it must.

A small fake API (stdlib HTTP on 127.0.0.1:0) serves submit, task status and the image; a
`websockets` sync server on 127.0.0.1:0 plays the push endpoint. The fake counts its status
GETs, and in push mode a task stays QUEUED for every GET: only the push server ends it (it
sends `task.done` shortly after the client's one status read that follows the connection),
so a wait that returns with one GET returned through push.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from typer.testing import CliRunner, Result
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse
from websockets.sync.server import ServerConnection, serve

import fakes

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client import GpuqueueClient  # noqa: E402
from gpuqueue_client.cli import app  # noqa: E402

TOKEN = "tok+alice/1="  # '+', '/' and '=' must reach the push server URL-encoded
PNG = b"\x89PNG\r\n\x1a\nfake"
STEPS = ["QUEUED", "RUNNING", "DONE"]  # what successive GETs see when polling ends a task
WAIT_LIMIT = 10.0  # the longest any fake waits on the client


# -- the fake API -------------------------------------------------------------------------------


@dataclass
class FakeApi:
    """Submit, status, image; `X-Push-Url` on the submit and/or the status answers."""

    push_url: str | None = None
    push_on_submit: bool = True
    push_on_status: bool = True
    # True: each status GET moves the task one step (polling ends it); False: only `finish`.
    advance_on_get: bool = True
    # What a RUNNING task's view says of its GPU's steps (None: a protocol with none).
    progress: dict[str, Any] | None = None
    url: str = ""
    tasks: dict[str, str] = field(default_factory=dict)  # task id -> status
    status_gets: list[str] = field(default_factory=list)
    crashes: list[BaseException] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    stopping: bool = False

    def handle(
        self, method: str, path: str, authorization: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        with self.changed:
            try:
                return self._route(method, path, authorization)
            except Exception as exc:  # a bug in the fake: fail the test at teardown
                self.crashes.append(exc)
                return 500, {}, b"fake API crashed"
            finally:
                self.changed.notify_all()

    def _route(
        self, method: str, path: str, authorization: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if authorization != f"Bearer {TOKEN}":
            return 401, {}, json.dumps({"message": "Unauthorized"}).encode()
        if (method, path) == ("POST", "/api/v1/image/async"):
            task_id = str(uuid.uuid4())
            self.tasks[task_id] = "QUEUED"
            body = {"task_id": task_id, "status": "QUEUED", "message": "queued"}
            return 202, self._push_header(self.push_on_submit), json.dumps(body).encode()
        task_id = path.rsplit("/", 1)[-1]
        if task_id not in self.tasks:
            return 404, {}, json.dumps({"error": "task not found", "code": "NOT_FOUND"}).encode()
        if (method, path) == ("GET", f"/api/v1/tasks/{task_id}"):
            self.status_gets.append(task_id)
            view = self.view(task_id)
            if self.advance_on_get and self.tasks[task_id] != "DONE":
                self.tasks[task_id] = STEPS[STEPS.index(self.tasks[task_id]) + 1]
            return 200, self._push_header(self.push_on_status), json.dumps(view).encode()
        if (method, path) == ("DELETE", f"/api/v1/tasks/{task_id}"):
            if self.tasks[task_id] == "QUEUED":
                self.tasks[task_id] = "CANCELED"
            view = self.view(task_id)
            view["cancel_requested"] = view["status"] == "RUNNING"
            return 200, {}, json.dumps(view).encode()
        if (method, path) == ("GET", f"/api/images/{task_id}") and self.tasks[task_id] == "DONE":
            return 200, {"Content-Type": "image/png"}, PNG
        return 409, {}, json.dumps({"error": "not DONE", "code": "CONFLICT"}).encode()

    def _push_header(self, announce: bool) -> dict[str, str]:
        return {"X-Push-Url": self.push_url} if announce and self.push_url else {}

    def view(self, task_id: str) -> dict[str, Any]:
        status = self.tasks[task_id]
        view = {"task_id": task_id, "kind": "image", "status": status, "attempt": 1}
        if status == "RUNNING" and self.progress is not None:
            view["progress"] = self.progress
        return view

    def running(self, task_id: str, step: int, steps: int, eta: float | None) -> dict[str, Any]:
        """The task RUNNING at step `step` of `steps`, as a `task.progress` push carries it."""
        with self.changed:
            self.tasks[task_id] = "RUNNING"
            fraction = round(step / steps, 4)
            self.progress = {"step": step, "steps": steps, "fraction": fraction, "eta_seconds": eta}
            return self.view(task_id)

    def finish(self, task_id: str) -> dict[str, Any]:
        with self.changed:
            self.tasks[task_id] = "DONE"
            return self.view(task_id)

    def wait_for_status_gets(self, count: int) -> bool:
        """Whether `count` status GETs were served within WAIT_LIMIT (False when stopping)."""
        with self.changed:
            self.changed.wait_for(
                lambda: self.stopping or len(self.status_gets) >= count, timeout=WAIT_LIMIT
            )
            return not self.stopping and len(self.status_gets) >= count

    def stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()


def serve_http(api: FakeApi) -> AbstractContextManager[str]:
    def handle(request: fakes.Request) -> fakes.Reply:
        status, headers, payload = api.handle(
            request.method, request.path, request.headers.get("Authorization")
        )
        return status, {"Content-Type": "application/json", **headers}, payload

    return fakes.serve(handle)


# -- the fake push endpoint ---------------------------------------------------------------------


@dataclass
class FakePush:
    """The WebSocket side. mode: deliver (send the end), progress (send the GPU's steps,
    then the end), refuse (HTTP 403 at the handshake), drop (close without a word), silent
    (send nothing, ever)."""

    api: FakeApi
    mode: str = "deliver"
    tokens: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    # Status GETs served when each connection's handshake was answered (by connection id).
    reads_at_open: dict[uuid.UUID, int] = field(default_factory=dict)

    def process_request(
        self, connection: ServerConnection, request: WsRequest
    ) -> WsResponse | None:
        token = parse_qs(urlsplit(request.path).query).get("token", [""])[0]
        self.tokens.append(token)
        if self.mode == "refuse":
            return connection.respond(HTTPStatus.FORBIDDEN, "push is off\n")
        if token != TOKEN:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad token\n")
        # Counted before the handshake's answer: the client's next status read comes after.
        self.reads_at_open[connection.id] = len(self.api.status_gets)
        return None

    def handle(self, connection: ServerConnection) -> None:
        # The client reads the task's status once after connecting: end the task only then,
        # so that read sees it QUEUED and only this socket can tell the client it ended.
        if not self.api.wait_for_status_gets(self.reads_at_open[connection.id] + 1):
            return
        if self.mode == "drop":
            connection.close()
            return
        if self.mode == "progress":
            task_id = self.api.status_gets[-1]
            for step, eta in ((6, 8.0), (18, 3.4)):
                event = {"type": "task.progress", "task": self.api.running(task_id, step, 30, eta)}
                self.sent.append(event)
                connection.send(json.dumps(event))
            self.sent.append({"type": "task.done", "task": self.api.finish(task_id)})
            connection.send(json.dumps(self.sent[-1]))
        if self.mode == "deliver":
            time.sleep(0.1)
            task_id = self.api.status_gets[-1]
            other = {"task_id": "someone-elses", "kind": "image", "status": "DONE", "attempt": 1}
            for event in (
                {"type": "task.done", "task": other},  # another task: ignored
                {"type": "task.done", "task": self.api.finish(task_id)},
            ):
                self.sent.append(event)
                connection.send(json.dumps(event))
        with suppress(ConnectionClosed):  # until the client (or shutdown) closes it
            for _ in connection:
                pass


@contextmanager
def serve_push(push: FakePush) -> Iterator[str]:
    server = serve(push.handle, "127.0.0.1", 0, process_request=push.process_request)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}/prod"
    finally:
        push.api.stop()
        server.shutdown()
        thread.join(timeout=5)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Stack = Callable[..., tuple[FakeApi, FakePush]]


@pytest.fixture
def stack() -> Iterator[Stack]:
    """stack(mode, **api options): a fake API whose X-Push-Url names a fake push server
    (mode "unreachable": a port where nothing listens)."""
    started: list[FakeApi] = []
    with ExitStack() as servers:

        def start(mode: str = "deliver", **options: Any) -> tuple[FakeApi, FakePush]:
            api = FakeApi(**options)
            push = FakePush(api, mode=mode)
            api.url = servers.enter_context(serve_http(api))
            if mode == "unreachable":
                api.push_url = f"ws://127.0.0.1:{closed_port()}/prod"
            else:
                api.push_url = servers.enter_context(serve_push(push))
            started.append(api)
            return api, push

        yield start
    for api in started:
        assert not api.crashes, api.crashes


def gpuqueue(api: FakeApi, *args: str, tmp_path: Path, terminal: bool = False) -> Result:
    env = {
        "GPUQUEUE_API_URL": api.url,
        "GPUQUEUE_TOKEN": TOKEN,
        "GPUQUEUE_CONFIG_DIR": str(tmp_path / "config"),
        "COLUMNS": "160",
        "NO_COLOR": "1",
        # A terminal (the live line and its bar) or a pipe (a line per change).
        "TTY_COMPATIBLE": "1" if terminal else "0",
    }
    return CliRunner().invoke(app, list(args), env=env)


def generate_wait(api: FakeApi, tmp_path: Path, *extra: str, terminal: bool = False) -> Result:
    out = tmp_path / "out.png"
    args = ["generate", "a red fox", "--wait", "-o", str(out), "--poll-interval", "0.01"]
    if "--timeout" not in extra:
        args += ["--timeout", str(WAIT_LIMIT * 2)]
    return gpuqueue(api, *args, *extra, tmp_path=tmp_path, terminal=terminal)


# -- the CLI --------------------------------------------------------------------------------------


def test_generate_wait_hears_the_end_over_push_with_one_status_read(
    stack: Stack, tmp_path: Path
) -> None:
    # Given an API that announces push, and tasks that only the push server ends
    api, push = stack("deliver", advance_on_get=False)

    # When the CLI waits for a new task
    result = generate_wait(api, tmp_path)

    # Then it connected with its token, read the status once, and the event ended the wait
    assert result.exit_code == 0, result.output
    assert push.tokens == [TOKEN]
    assert len(api.status_gets) == 1
    assert [event["task"]["status"] for event in push.sent] == ["DONE", "DONE"]
    assert (tmp_path / "out.png").read_bytes() == PNG
    assert f"task {api.status_gets[0]} DONE in" in result.stderr


@pytest.mark.parametrize("mode", ["refuse", "unreachable", "drop"])
def test_generate_wait_falls_back_to_polling_when_push_fails(
    stack: Stack, tmp_path: Path, mode: str
) -> None:
    # Given a push endpoint that refuses the handshake, is not there, or hangs up
    api, push = stack(mode)

    result = generate_wait(api, tmp_path)

    # Then the wait goes on by polling: QUEUED, RUNNING, DONE
    assert result.exit_code == 0, result.output
    assert len(api.status_gets) >= 3
    assert push.sent == []
    assert (tmp_path / "out.png").read_bytes() == PNG


def test_no_push_always_polls(stack: Stack, tmp_path: Path) -> None:
    api, push = stack("deliver")

    result = generate_wait(api, tmp_path, "--no-push")

    assert result.exit_code == 0, result.output
    assert push.tokens == []
    assert len(api.status_gets) == 3


def test_without_the_header_the_wait_polls(stack: Stack, tmp_path: Path) -> None:
    api, push = stack("deliver", push_on_submit=False, push_on_status=False)

    result = generate_wait(api, tmp_path)

    assert result.exit_code == 0, result.output
    assert push.tokens == []
    assert len(api.status_gets) == 3


def test_generate_wait_on_push_still_times_out(stack: Stack, tmp_path: Path) -> None:
    # Given a push socket that never speaks and a task that never ends
    api, push = stack("silent", advance_on_get=False)

    started = time.monotonic()
    result = generate_wait(api, tmp_path, "--timeout", "2")

    # Then the wait gives up at the timeout, with one last status read
    assert result.exit_code == 1
    assert "not finished after 2 s" in result.stderr
    assert push.tokens == [TOKEN]
    assert len(api.status_gets) == 2
    assert 2 <= time.monotonic() - started < WAIT_LIMIT


# -- progress while it runs ---------------------------------------------------------------------

BAR = "\u2501"  # rich's bar is drawn with heavy horizontals


def test_generate_wait_on_a_terminal_shows_the_gpus_steps_as_a_bar_from_push(
    stack: Stack, tmp_path: Path
) -> None:
    # Given a push server that sends the task's steps (6/30, then 18/30) before its end
    api, push = stack("progress", advance_on_get=False)

    result = generate_wait(api, tmp_path, terminal=True)

    # Then the live line drew a bar with step n/N and the ETA, on stderr only
    assert result.exit_code == 0, result.output
    assert [event["type"] for event in push.sent] == ["task.progress"] * 2 + ["task.done"]
    assert "step 6/30, ETA 8 s" in result.stderr
    assert "step 18/30, ETA 3 s" in result.stderr
    assert BAR in result.stderr
    task_id = api.status_gets[0]
    # stdout is what scripts read: the task id, then the file, nothing else
    assert result.stdout.splitlines() == [task_id, str(tmp_path / "out.png")]


def test_generate_wait_shows_the_steps_a_polled_status_reports(
    stack: Stack, tmp_path: Path
) -> None:
    # Given no push, and a status answer that shows the task RUNNING at step 12 of 30
    progress = {"step": 12, "steps": 30, "fraction": 0.4, "eta_seconds": 6.0}
    api, _ = stack("deliver", progress=progress)

    result = generate_wait(api, tmp_path, "--no-push", terminal=True)

    assert result.exit_code == 0, result.output
    assert "step 12/30, ETA 6 s" in result.stderr
    assert BAR in result.stderr


def test_a_protocol_that_reports_no_steps_gets_no_bar(stack: Stack, tmp_path: Path) -> None:
    api, _ = stack("deliver")  # RUNNING views without progress (the OpenAI images API)

    result = generate_wait(api, tmp_path, "--no-push", terminal=True)

    assert result.exit_code == 0, result.output
    assert "RUNNING" in result.stderr
    assert BAR not in result.stderr
    assert "step" not in result.stderr


def test_off_a_terminal_each_step_is_one_line_on_stderr(stack: Stack, tmp_path: Path) -> None:
    api, _ = stack("progress", advance_on_get=False)

    result = generate_wait(api, tmp_path)

    assert result.exit_code == 0, result.output
    lines = [line.rsplit(" (", 1)[0] for line in result.stderr.splitlines()]
    task_id = api.status_gets[0]
    assert lines[:4] == [
        f"task {task_id}: QUEUED",
        f"task {task_id}: RUNNING, step 6/30, ETA 8 s",
        f"task {task_id}: RUNNING, step 18/30, ETA 3 s",
        f"task {task_id}: DONE",
    ]
    assert BAR not in result.stderr
    assert result.stdout.splitlines() == [task_id, str(tmp_path / "out.png")]


def test_cancel_tells_a_running_tasks_requested_cancel_from_a_done_one(
    stack: Stack, tmp_path: Path
) -> None:
    api, _ = stack("silent", advance_on_get=False)
    client = GpuqueueClient(api.url, TOKEN)
    queued = str(client.submit_image("a red fox")["task_id"])
    running = str(client.submit_image("a blue fox")["task_id"])
    api.running(running, 3, 30, None)

    done = gpuqueue(api, "cancel", queued, tmp_path=tmp_path)
    asked = gpuqueue(api, "cancel", running, tmp_path=tmp_path)

    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == f"task {queued}: CANCELED"
    assert asked.exit_code == 0, asked.output
    assert asked.stdout.strip() == f"task {running}: RUNNING, cancel requested"
    assert "being stopped" in asked.stderr


# -- the client ---------------------------------------------------------------------------------


def test_a_push_url_first_seen_on_a_status_answer_is_used(
    stack: Stack,
) -> None:
    # Given an API that announces push on status answers only (not on the submit answer)
    api, push = stack("deliver", push_on_submit=False, advance_on_get=False)
    client = GpuqueueClient(api.url, TOKEN)
    task_id = client.submit_image("a red fox")["task_id"]
    assert client.push_url is None

    seen: list[str] = []
    task = client.wait(task_id, timeout=WAIT_LIMIT, on_update=lambda t: seen.append(t["status"]))

    # Then: one poll that learns of push, one read after connecting, then the event
    assert task["status"] == "DONE"
    assert client.push_url == api.push_url
    assert len(api.status_gets) == 2
    assert seen == ["QUEUED", "QUEUED", "DONE"]
    assert push.tokens == [TOKEN]


def test_a_lost_event_costs_one_check_interval_not_the_timeout(
    stack: Stack,
) -> None:
    # Given a push socket that stays silent while polling would see the task end
    api, push = stack("silent")
    client = GpuqueueClient(api.url, TOKEN)
    client.push_check_interval = 0.05
    task_id = client.submit_image("a red fox")["task_id"]

    task = client.wait(task_id, timeout=WAIT_LIMIT)

    # Then the periodic status check finds the end (a wait that ran into its timeout would
    # raise TimeoutError): the read after connecting, then one check per interval
    assert task["status"] == "DONE"
    assert push.tokens == [TOKEN]
    assert len(api.status_gets) == 3


def test_a_task_already_over_when_the_socket_opens_is_not_missed(
    stack: Stack,
) -> None:
    # Given a task that ended before the client connected (no event will ever come)
    api, push = stack("silent", advance_on_get=False)
    client = GpuqueueClient(api.url, TOKEN)
    task_id = client.submit_image("a red fox")["task_id"]
    api.finish(task_id)

    task = client.wait(task_id, timeout=WAIT_LIMIT)

    # Then the status read after connecting returns it at once: that one read, no check
    assert task["status"] == "DONE"
    assert push.tokens == [TOKEN]
    assert len(api.status_gets) == 1
