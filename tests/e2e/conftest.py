"""The local stack, started once per session on free ports, driven over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 90.0


@dataclass
class LocalStackProcess:
    process: subprocess.Popen[bytes]
    state: dict[str, Any]
    log_path: Path

    @property
    def api(self) -> str:
        return str(self.state["api_url"])

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def aws(self, service: str) -> Any:
        """A boto3 client on this stack's moto server."""
        return boto3.client(service, **self._moto_args())

    def aws_resource(self, service: str) -> Any:
        return boto3.resource(service, **self._moto_args())

    def _moto_args(self) -> dict[str, str]:
        return {
            "endpoint_url": self.state["moto_url"],
            "region_name": self.state["region"],
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }

    def knobs(self, server: int, **changes: Any) -> None:
        url = self.state["image_servers"][server]
        requests.post(f"{url}/knobs", json=changes, timeout=5).raise_for_status()

    def forget_call_times(self) -> None:
        """Drop the slots' measured call times, so earlier tests (a held call measured at
        seconds) do not make the balancer judge one stand-in slower than the other."""
        table = self.aws_resource("dynamodb").Table(self.state["resources"]["EndpointsTable"])
        for item in table.scan(ProjectionExpression="endpoint_id, row_type")["Items"]:
            if item.get("row_type") == "slot":
                table.update_item(
                    Key={"endpoint_id": item["endpoint_id"]},
                    UpdateExpression="REMOVE call_seconds_ewma",
                )

    def endpoint_stats(self, server: int) -> dict[str, Any]:
        url = self.state["image_servers"][server]
        stats: dict[str, Any] = requests.get(f"{url}/stats", timeout=5).json()
        return stats

    @property
    def speech_servers(self) -> list[str]:
        """The speech stand-ins' URLs (`--speech-servers N` in extra_args; 1 by default)."""
        return list(self.state.get("speech_servers", []))

    def speech_knobs(self, server: int = 0, **changes: Any) -> None:
        url = self.speech_servers[server]
        requests.post(f"{url}/knobs", json=changes, timeout=5).raise_for_status()

    def speech_stats(self, server: int = 0) -> dict[str, Any]:
        url = self.speech_servers[server]
        stats: dict[str, Any] = requests.get(f"{url}/stats", timeout=5).json()
        return stats


@contextlib.contextmanager
def running_stack(workdir: Path, *extra_args: str) -> Iterator[LocalStackProcess]:
    """`python -m gpuqueue_local` on free ports, until the block ends (then Ctrl-C)."""
    state_file = workdir / "state.json"
    log_path = workdir / "stack.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "local")}
    env.pop("AWS_ENDPOINT_URL", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpuqueue_local",
                "--port",
                "0",
                "--state-file",
                str(state_file),
                "--image-servers",
                "2",
                "--image-latency",
                "0.2",
                "--schedule-speedup",
                "20",
                *extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stack = None
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("local stack exited:\n" + log_path.read_text())
            if state_file.exists():
                state = json.loads(state_file.read_text())
                if requests.get(f"{state['api_url']}/health", timeout=2).status_code == 200:
                    stack = LocalStackProcess(process=process, state=state, log_path=log_path)
                    break
            time.sleep(0.2)
        if stack is None:
            raise TimeoutError("local stack not ready:\n" + log_path.read_text())
        yield stack
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStackProcess]:
    with running_stack(tmp_path_factory.mktemp("local-stack")) as stack:
        yield stack


@dataclass
class ApiUser:
    api: str
    username: str
    password: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.api}{path}", headers=self.auth, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.api}{path}", headers=self.auth, timeout=30, **kwargs)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(f"{self.api}{path}", headers=self.auth, timeout=30)

    def submit(self, prompt: str, **params: Any) -> str:
        response = self.post("/api/v1/image/async", json={"prompt": prompt, **params})
        assert response.status_code == 202, response.text
        return str(response.json()["task_id"])

    def wait(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            task: dict[str, Any] = self.get(f"/api/v1/tasks?task_id={task_id}").json()
            if task["status"] in ("DONE", "FAILED", "CANCELED", "EXPIRED"):
                return task
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still {task['status']} after {timeout}s")
            time.sleep(0.2)


def register_user(stack: LocalStackProcess, prefix: str = "u") -> ApiUser:
    username = f"{prefix}{uuid.uuid4().hex[:10]}"
    password = "pass1234word"
    response = requests.post(
        f"{stack.api}/register",
        json={"username": username, "password": password},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return ApiUser(stack.api, username, password, response.json()["token"])


@pytest.fixture
def new_user(local_stack: LocalStackProcess) -> ApiUser:
    return register_user(local_stack)


FINAL_PUSHES = frozenset({"task.done", "task.failed", "task.canceled", "task.expired"})


class PushedProgress:
    """A user's WebSocket, open while a task runs: every push it hears, read in the
    background, to tell which progress steps reached the owner and when the end came."""

    def __init__(self, stack: LocalStackProcess, user: ApiUser) -> None:
        url = stack.state.get("websocket_url")
        assert url, "the local stack serves no WebSocket API"
        self._url = f"{url}?token={user.token}"
        self._messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._client: ClientConnection | None = None
        self._reader = threading.Thread(target=self._read, name="pushes", daemon=True)
        self._reader.start()
        assert self._connected.wait(10), "the WebSocket did not connect within 10 s"

    def _read(self) -> None:
        with connect(self._url) as client:
            self._client = client
            self._connected.set()
            with contextlib.suppress(ConnectionClosed):
                for raw in client:
                    with self._lock:
                        self._messages.append(json.loads(raw))

    def about(self, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self._messages if m.get("task", {}).get("task_id") == task_id]

    def steps(self, task_id: str) -> list[int]:
        """The steps of the task's progress pushes, in the order they came."""
        return [
            int(m["task"]["progress"]["step"])
            for m in self.about(task_id)
            if m.get("type") == "task.progress" and m["task"].get("progress")
        ]

    def ended(self, task_id: str) -> bool:
        return any(m.get("type") in FINAL_PUSHES for m in self.about(task_id))

    def __enter__(self) -> PushedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
        self._reader.join(timeout=5)
