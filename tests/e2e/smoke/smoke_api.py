"""The seeds' client flow over plain HTTP, for the smoke suite.

Nothing here knows whether the stack is local or deployed: no AWS credentials, no state
file, no admin user, only the API's URL and users that sign themselves up, as any client
of a deployed stack would.
"""

from __future__ import annotations

import io
import secrets
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import requests
from PIL import Image

# API Gateway answers within 30 s or gives up, so no single request needs longer.
REQUEST_TIMEOUT_SECONDS = 30.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINAL_STATUSES = frozenset({"DONE", "FAILED", "CANCELED", "EXPIRED"})


def new_username() -> str:
    """Unique per run and recognisable: a deployed stack keeps the users a smoke run
    creates (only an operator can delete them), so they say what made them."""
    return f"smoke-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def new_password() -> str:
    """Long and random, plus one character of every class a Cognito password policy can
    require (lower, upper, digit, symbol): it meets template.yaml's PasswordPolicy with any
    PasswordMinimumLength (99 at most), and a stricter one on a stack deployed from another
    revision (Cognito takes up to 256 characters; the local stack's moto too, `moto_cognito`)."""
    return f"{secrets.token_urlsafe(72)}aQ7!"


@dataclass
class SmokeUser:
    """A signed-up user's requests to one API (a session: TLS connections are reused)."""

    api: str
    username: str
    # Kept out of reprs: a failing run's report (a CI log) must not show them.
    password: str = field(repr=False)
    token: str = field(repr=False)
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.session.request(
            method, f"{self.api}{path}", headers=headers, timeout=REQUEST_TIMEOUT_SECONDS, **kwargs
        )

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)


def sign_up(api: str) -> SmokeUser:
    """Register a fresh user, then log in as it: the login's token is the one used after."""
    username, password = new_username(), new_password()
    credentials = {"username": username, "password": password}
    registered = requests.post(f"{api}/register", json=credentials, timeout=REQUEST_TIMEOUT_SECONDS)
    assert registered.status_code == 201, f"POST /register: {_said(registered)}"
    assert registered.json().get("token"), f"POST /register gave no token: {registered.text}"
    login = requests.post(f"{api}/login", json=credentials, timeout=REQUEST_TIMEOUT_SECONDS)
    assert login.status_code == 200, f"POST /login: {_said(login)}"
    token = login.json().get("token")
    assert isinstance(token, str), f"POST /login gave no token: {login.text}"
    assert token, f"POST /login gave an empty token: {login.text}"
    return SmokeUser(api, username, password, token)


@dataclass(frozen=True)
class FinishedTask:
    submitted: dict[str, Any]  # the 202 answer
    task: dict[str, Any]  # the last state read, a final one
    seen: list[str]  # every status read while polling, in order

    @property
    def task_id(self) -> str:
        return str(self.submitted["task_id"])

    def assert_done(self) -> dict[str, Any]:
        """The task, once DONE; otherwise fail with how it ended and the task's error."""
        status = self.task["status"]
        assert status == "DONE", (
            f"task {self.task_id} ended {status}, error: {self.task.get('error')!r} "
            f"(statuses seen: {' -> '.join(self.seen)})"
        )
        return self.task


def submit_and_wait(
    user: SmokeUser, body: dict[str, Any], *, timeout: float, interval: float
) -> FinishedTask:
    """The seed client's loop: submit, then `GET /api/v1/tasks?task_id=` until the task
    ends; AssertionError (with the statuses seen) when it has not ended by the deadline."""
    submitted = user.post("/api/v1/image/async", json=body)
    assert submitted.status_code == 202, f"POST /api/v1/image/async: {_said(submitted)}"
    answer: dict[str, Any] = submitted.json()
    task_id = answer["task_id"]
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        read = user.get("/api/v1/tasks", params={"task_id": task_id})
        assert read.status_code == 200, f"GET /api/v1/tasks?task_id={task_id}: {_said(read)}"
        task: dict[str, Any] = read.json()
        if not seen or seen[-1] != task["status"]:
            seen.append(task["status"])
        if task["status"] in FINAL_STATUSES:
            return FinishedTask(submitted=answer, task=task, seen=seen)
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"task {task_id} is still {task['status']} after {timeout:g} s on {user.api} "
                f"(statuses seen: {' -> '.join(seen)}; queue_position "
                f"{task.get('queue_position')}, eta_seconds {task.get('eta_seconds')})"
            )
        time.sleep(interval)


def fetch_image(user: SmokeUser, result_url: str) -> tuple[requests.Response, requests.Response]:
    """The API's answer to `GET /api/images/{id}` (a redirect) and the download it points
    to, fetched without the bearer token (a presigned URL carries its own signature)."""
    redirect = user.get(result_url, allow_redirects=False)
    location = redirect.headers.get("Location", "")
    download = requests.get(urljoin(f"{user.api}/", location), timeout=REQUEST_TIMEOUT_SECONDS)
    return redirect, download


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG: the signature, the IHDR chunk's size, and a full decode
    (a truncated or corrupt file fails here, not only a wrong header)."""
    assert data[:8] == PNG_SIGNATURE, f"not a PNG: starts with {data[:16]!r}"
    assert data[12:16] == b"IHDR", f"a PNG without IHDR first: {data[8:24]!r}"
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (width, height)
    return int(width), int(height)


def _said(response: requests.Response) -> str:
    return f"{response.status_code} {response.text[:500]}"
