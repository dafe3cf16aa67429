"""The `gpuqueue` client and CLI against a fake API and a fake S3, both stdlib HTTP servers.

The fake API keeps state: users, tokens, and tasks that move QUEUED -> RUNNING -> DONE (or
FAILED) one step per GET, so `--wait` polls for real. `/api/images/{id}` redirects to the
fake S3, which refuses any request that carries an Authorization header, as S3 does for a
presigned URL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from typer.testing import CliRunner, Result

from fakes import Reply, Request, reply, serve

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client import ApiError, GpuqueueClient  # noqa: E402
from gpuqueue_client import credentials as creds  # noqa: E402
from gpuqueue_client.cli import app  # noqa: E402
from gpuqueue_client.commands.invocation import describe_error  # noqa: E402

PASSWORD = "correct horse battery"
EMAILED_CODE = "246810"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST_POLL = ["--poll-interval", "0.01"]


def png_for(task_id: str) -> bytes:
    return PNG_MAGIC + b"fake image of task " + task_id.encode()


def api_error(status: int, message: str, code: str, fld: str | None = None) -> Reply:
    body = {"error": message, "code": code} | ({"field": fld} if fld else {})
    return reply(status, body)


# -- the fake servers ------------------------------------------------------------------------


@dataclass
class FakeTask:
    task_id: str
    owner: str
    prompt: str
    params: dict[str, Any]
    created_at: str
    script: list[str]
    error: str | None = None
    polls: int = 0
    canceled: bool = False

    @property
    def status(self) -> str:
        return "CANCELED" if self.canceled else self.script[min(self.polls, len(self.script) - 1)]

    def view(self) -> dict[str, Any]:
        status = self.status
        return {
            "task_id": self.task_id,
            "user_id": f"sub-{self.owner}",
            "kind": "image",
            "prompt": self.prompt,
            "status": status,
            "created_at": self.created_at,
            "updated_at": self.created_at,
            "attempt": 1,
            "params": self.params,
            "result_url": f"/api/images/{self.task_id}" if status == "DONE" else None,
            "error": self.error if status == "FAILED" else None,
        }


NORMAL = ["QUEUED", "RUNNING", "DONE"]
FAILING = ["QUEUED", "RUNNING", "FAILED"]
ENDLESS = ["QUEUED", "RUNNING"]
SUBMIT_FIELDS = {"prompt", "negative_prompt", "width", "height", "steps", "seed", "priority"}
STATS = {
    "queue_length": 3,
    "queue_capacity": 100,
    "queue_usage": 0.03,
    "in_flight": 1,
    "delayed": 0,
    "dead_letter": 0,
    "workers": 2,
}


@dataclass
class FakeApi:
    """The routes of the README's "The API", canned but stateful."""

    s3_url: str
    url: str = ""
    users: dict[str, str] = field(default_factory=lambda: {"alice": PASSWORD})
    tokens: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    submitted: list[dict[str, Any]] = field(default_factory=list)
    seen_auth: list[str | None] = field(default_factory=list)
    queue_full: bool = False
    # SignUpVerification=email: /register answers 202, /register/confirm takes CODE.
    verify_by_email: bool = False
    unconfirmed: dict[str, str] = field(default_factory=dict)
    stats_broken: bool = False
    # The admin API: users in the Cognito group `admin`, the endpoints, the PUT bodies.
    admins: set[str] = field(default_factory=lambda: {"ops"})
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoint_puts: list[dict[str, Any]] = field(default_factory=list)
    crashes: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue_token(self, username: str) -> str:
        token = f"tok-{username}-{uuid.uuid4().hex[:12]}"
        self.tokens[token] = username
        return token

    def add_task(self, owner: str, prompt: str, script: list[str] | None = None) -> FakeTask:
        if script is None:
            script = FAILING if "fail" in prompt else ENDLESS if "slow" in prompt else NORMAL
        task = FakeTask(
            task_id=str(uuid.uuid4()),
            owner=owner,
            prompt=prompt,
            params={"width": 512, "height": 512, "steps": 30},
            created_at=f"2026-01-01T00:{len(self.tasks):02d}:00+00:00",
            script=list(script),
            error="CUDA out of memory" if script == FAILING else None,
        )
        self.tasks[task.task_id] = task
        return task

    def handle(self, request: Request) -> Reply:
        with self.lock:
            try:
                return self._route(request)
            except Exception as exc:  # a bug in the fake: fail the test at teardown
                self.crashes.append(exc)
                return api_error(500, f"fake API crashed: {exc!r}", "INTERNAL")

    def _route(self, request: Request) -> Reply:  # noqa: PLR0911 - one return per route
        method, path = request.method, request.path
        if method == "POST" and path in ("/register", "/register/confirm", "/login"):
            return self._auth(path, request.json())
        authorization = request.headers.get("Authorization")
        self.seen_auth.append(authorization)
        user = self.tokens.get((authorization or "").removeprefix("Bearer "))
        if user is None:
            return reply(401, {"message": "Unauthorized"})  # API Gateway's JWT authorizer
        if (method, path) == ("POST", "/api/v1/image/async"):
            return self._submit(user, request.json())
        if (method, path) == ("GET", "/api/v1/tasks"):
            return self._list(user, request.query)
        if (method, path) == ("GET", "/api/v1/system/stats"):
            return self._stats()
        if path.startswith("/api/v1/admin/"):
            return self._admin(method, user, path, request)
        if match := re.fullmatch(r"/api/v1/tasks/([^/]+)", path):
            return self._task(method, user, match[1])
        if method == "GET" and (match := re.fullmatch(r"/api/images/([^/]+)", path)):
            return self._image(user, match[1])
        return api_error(404, "no such route", "NOT_FOUND")

    def _auth(self, path: str, body: dict[str, Any]) -> Reply:
        username, password = str(body.get("username", "")), str(body.get("password", ""))
        if path == "/register" and self.verify_by_email:
            if username not in self.users:
                self.unconfirmed[username] = password
            return reply(202, {"status": "CONFIRMATION_PENDING", "message": "check your e-mail"})
        if path == "/register/confirm":
            if body.get("code") != EMAILED_CODE or self.unconfirmed.get(username) != password:
                return api_error(400, "code: wrong or expired confirmation code", "INVALID_CODE")
            self.users[username] = self.unconfirmed.pop(username)
        elif path == "/register":
            if username in self.users:
                return api_error(409, "user already exists", "CONFLICT", "username")
            if len(password) < 8:
                message = "Password did not conform with policy: too short"
                return api_error(400, message, "INVALID_PASSWORD", "password")
            self.users[username] = password
        elif self.users.get(username) != password:
            return api_error(401, "wrong username or password", "UNAUTHORIZED")
        token = self.issue_token(username)
        status = 201 if path == "/register" else 200
        return reply(status, {"token": token, "token_type": "Bearer", "expires_in": 3600})

    def _submit(self, user: str, body: dict[str, Any]) -> Reply:
        if unknown := sorted(set(body) - SUBMIT_FIELDS):
            message = f"{unknown[0]}: Extra inputs are not permitted"
            return api_error(400, message, "VALIDATION_ERROR", unknown[0])
        prompt = str(body.get("prompt", "")).strip()
        if not prompt:
            message = "prompt: String should have at least 1 character"
            return api_error(400, message, "VALIDATION_ERROR", "prompt")
        width = body.get("width", 512)
        if not isinstance(width, int) or width % 8 or not 64 <= width <= 2048:
            message = "width: must be a multiple of 8 in 64-2048"
            return api_error(400, message, "VALIDATION_ERROR", "width")
        if self.queue_full:
            body = {"error": "the queue is full", "code": "QUEUE_FULL"}
            return reply(503, body, {"Retry-After": "7"})
        self.submitted.append(body)
        task = self.add_task(user, prompt)
        accepted = {"task_id": task.task_id, "status": "QUEUED", "message": "queued"}
        return reply(202, accepted, {"Location": f"/api/v1/tasks/{task.task_id}"})

    def _list(self, user: str, query: dict[str, list[str]]) -> Reply:
        limit = int(query.get("limit", ["20"])[0])
        if not 1 <= limit <= 100:
            return api_error(400, "limit: must be 1-100", "VALIDATION_ERROR", "limit")
        offset = int(query.get("cursor", ["0"])[0])
        mine = [t for t in reversed(self.tasks.values()) if t.owner == user]
        page = mine[offset : offset + limit]
        more = offset + limit < len(mine)
        headers = {"X-Next-Cursor": str(offset + limit)} if more else None
        return reply(200, [t.view() for t in page], headers)

    def _stats(self) -> Reply:
        if self.stats_broken:  # a proxy's HTML error page, not our JSON
            return 502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>"
        return reply(200, STATS)

    def _task(self, method: str, user: str, task_id: str) -> Reply:
        task = self.tasks.get(task_id)
        if task is None or task.owner != user:
            return api_error(404, "task not found", "NOT_FOUND")
        if method == "GET":
            view = task.view()
            task.polls += 1  # the next GET sees the next state
            return reply(200, view)
        if method != "DELETE":
            return api_error(405, "method not allowed", "METHOD_NOT_ALLOWED")
        if task.status != "QUEUED":
            return api_error(409, f"task is {task.status}, not QUEUED", "CONFLICT")
        task.canceled = True
        return reply(200, task.view())

    def _image(self, user: str, task_id: str) -> Reply:
        task = self.tasks.get(task_id)
        if task is None or task.owner != user:
            return api_error(404, "task not found", "NOT_FOUND")
        if task.status != "DONE":
            return api_error(409, f"task is {task.status}, not DONE", "CONFLICT")
        location = f"{self.s3_url}/images/{task.task_id}.png?X-Amz-Signature=abc123"
        return 302, {"Location": location}, b""

    def add_endpoint(self, endpoint_id: str, **fields: Any) -> dict[str, Any]:
        row = {
            "endpoint_id": endpoint_id,
            "url": f"http://{endpoint_id}.gpu.internal:8000",
            "kind": "image",
            "protocol": "openai",
            "capacity": 1,
            "weight": 1,
            "state": "ACTIVE",
            "source": "admin",
            "healthy": False,
            "circuit": "CLOSED",
            "latency_ewma_ms": None,
            "in_flight": 0,
            "routable": False,
            **fields,
        }
        self.endpoints[endpoint_id] = row
        return row

    def _admin(self, method: str, user: str, path: str, request: Request) -> Reply:
        if user not in self.admins:
            message = "operators only: this route needs the group 'admin'"
            return api_error(403, message, "FORBIDDEN")
        if (method, path) == ("GET", "/api/v1/admin/endpoints"):
            kind = request.query.get("kind", [None])[0]
            rows = [e for e in self.endpoints.values() if kind in (None, e["kind"])]
            return reply(200, sorted(rows, key=lambda e: (e["kind"], e["endpoint_id"])))
        match = re.fullmatch(r"/api/v1/admin/endpoints/([^/]+)(/drain)?", path)
        if match is None:
            return api_error(404, "no such route", "NOT_FOUND")
        action = f"{method} drain" if match[2] else method
        return self._endpoint(action, unquote(match[1]), request)

    def _endpoint(self, action: str, endpoint_id: str, request: Request) -> Reply:
        row = self.endpoints.get(endpoint_id)
        if action == "PUT":
            body = request.json()
            self.endpoint_puts.append(body)
            if not 1 <= body.get("capacity", 1) <= 64:
                return api_error(400, "capacity: must be 1-64", "VALIDATION_ERROR", "capacity")
            # A PUT replaces the configuration, as the API does: what is left out is reset.
            config = {
                "protocol": "openai",
                "capacity": 1,
                "weight": 1,
                "state": "ACTIVE",
                "credentials": None,
                **body,
            }
            health = {k: v for k, v in (row or {}).items() if k != "endpoint_id"}
            return reply(200, self.add_endpoint(endpoint_id, **{**health, **config}))
        if row is None:
            return api_error(404, f"endpoint {endpoint_id} not found", "NOT_FOUND", "endpoint_id")
        if action == "POST drain":
            row["state"] = "DRAINING"
            return reply(200, row)
        if action == "DELETE":
            del self.endpoints[endpoint_id]
            return reply(200, {"endpoint_id": endpoint_id, "deleted": True})
        return api_error(405, "method not allowed", "METHOD_NOT_ALLOWED")


def xml_error(status: int, code: str, message: str = "") -> Reply:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return status, {"Content-Type": "application/xml"}, body.encode()


@dataclass
class FakeS3:
    """The presigned-URL host: PNG bytes, and S3's refusal of a second auth mechanism."""

    url: str = ""
    hits: list[dict[str, str]] = field(default_factory=list)

    def handle(self, request: Request) -> Reply:
        self.hits.append(dict(request.headers.items()))
        match = re.fullmatch(r"/images/([^/]+)\.png", request.path)
        if request.method != "GET" or match is None:
            return xml_error(404, "NoSuchKey")
        if request.headers.get("Authorization"):
            return xml_error(400, "InvalidArgument", "Only one auth mechanism allowed")
        if "X-Amz-Signature" not in request.query:
            return xml_error(403, "AccessDenied")
        return 200, {"Content-Type": "image/png"}, png_for(match[1])


@pytest.fixture
def s3() -> Iterator[FakeS3]:
    fake = FakeS3()
    with serve(fake.handle) as url:
        fake.url = url
        yield fake


@pytest.fixture
def api(s3: FakeS3) -> Iterator[FakeApi]:
    fake = FakeApi(s3_url=s3.url)
    with serve(fake.handle) as url:
        fake.url = url
        yield fake
    assert not fake.crashes, fake.crashes


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "config" / "gpuqueue"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, config_dir: Path) -> None:
    # The client functions (credentials.*) read the environment directly, too.
    monkeypatch.setenv("GPUQUEUE_CONFIG_DIR", str(config_dir))
    monkeypatch.delenv("GPUQUEUE_TOKEN", raising=False)
    monkeypatch.delenv("GPUQUEUE_API_URL", raising=False)


Invoke = Callable[..., Result]


@pytest.fixture
def cli(api: FakeApi, config_dir: Path) -> Invoke:
    runner = CliRunner()

    def invoke(
        *args: str, input: str | None = None, token: str | None = None, api_url: str | None = None
    ) -> Result:
        env = {
            "GPUQUEUE_API_URL": api_url or api.url,
            "GPUQUEUE_CONFIG_DIR": str(config_dir),
            "GPUQUEUE_TOKEN": token,
            "COLUMNS": "160",
            "NO_COLOR": "1",
        }
        return runner.invoke(app, list(args), input=input, env=env)

    return invoke


@pytest.fixture
def token(api: FakeApi) -> str:
    return api.issue_token("alice")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- login, register and the token cache ------------------------------------------------------


def test_login_caches_the_token_owner_only_and_later_commands_use_it(
    cli: Invoke, api: FakeApi, config_dir: Path
) -> None:
    result = cli("login", "-u", "alice", "-p", PASSWORD)

    assert result.exit_code == 0, result.output
    assert "logged in as alice" in result.stdout
    path = config_dir / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    entry = json.loads(path.read_text())[api.url]
    assert entry["username"] == "alice"
    assert api.tokens[entry["token"]] == "alice"
    assert entry["expires_at"] == pytest.approx(time.time() + 3600, abs=60)

    stats = cli("stats")
    assert stats.exit_code == 0, stats.output
    assert "queue_length" in stats.stdout
    assert api.seen_auth[-1] == f"Bearer {entry['token']}"


def test_login_prompts_for_what_is_missing_and_hides_the_password(cli: Invoke) -> None:
    result = cli("login", input=f"alice\n{PASSWORD}\n")

    assert result.exit_code == 0, result.output
    assert "logged in as alice" in result.output
    assert PASSWORD not in result.output


def test_login_tightens_an_existing_cache_file_and_keeps_other_apis(
    cli: Invoke, api: FakeApi, config_dir: Path
) -> None:
    config_dir.mkdir(parents=True)
    path = config_dir / "credentials.json"
    path.write_text(json.dumps({"https://other.example": {"token": "t", "username": "bob"}}))
    path.chmod(0o644)

    result = cli("login", "-u", "alice", "-p", PASSWORD)

    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(path.read_text())) == {"https://other.example", api.url}
    assert not list(config_dir.glob("*.tmp"))


def test_login_with_a_wrong_password_shows_the_apis_answer(cli: Invoke, config_dir: Path) -> None:
    result = cli("login", "-u", "alice", "-p", "nope-nope")

    assert result.exit_code == 1
    assert "error: wrong username or password" in result.stderr
    assert not (config_dir / "credentials.json").exists()


def test_register_logs_in(cli: Invoke, api: FakeApi) -> None:
    result = cli("register", "-u", "bob", "-p", "long enough")

    assert result.exit_code == 0, result.output
    assert "logged in as bob" in result.stdout
    assert api.users["bob"] == "long enough"
    assert creds.load(api.url) is not None


def test_register_where_sign_ups_are_verified_by_email_then_confirm_logs_in(
    cli: Invoke, api: FakeApi
) -> None:
    api.verify_by_email = True

    registered = cli("register", "-u", "bob", "-p", "long enough", "--email", "b@example.com")

    assert registered.exit_code == 0, registered.stderr
    assert "gpuqueue confirm -u bob --code CODE" in registered.stdout
    assert creds.load(api.url) is None  # no token yet

    confirmed = cli("confirm", "-u", "bob", "-p", "long enough", "--code", EMAILED_CODE)

    assert confirmed.exit_code == 0, confirmed.stderr
    assert creds.load(api.url) is not None
    assert "confirmed; logged in as bob" in confirmed.stdout
    assert api.users["bob"] == "long enough"


def test_register_weak_password_names_the_field(cli: Invoke) -> None:
    result = cli("register", "-u", "bob", "-p", "short")

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: Password did not conform with policy: too short (field: password)"
    )


def test_logout_forgets_the_token(cli: Invoke, api: FakeApi) -> None:
    assert cli("login", "-u", "alice", "-p", PASSWORD).exit_code == 0

    assert "logged out" in cli("logout").stdout
    assert creds.load(api.url) is None
    assert "not logged in" in cli("logout").stdout


# -- generate ---------------------------------------------------------------------------------


def test_generate_prints_the_task_id_and_sends_only_the_set_fields(
    cli: Invoke, api: FakeApi, token: str
) -> None:
    result = cli("generate", "a red fox", "--width", "256", "--seed", "7", token=token)

    assert result.exit_code == 0, result.output
    (task_id,) = api.tasks
    assert result.stdout.strip() == task_id
    assert api.submitted == [{"prompt": "a red fox", "width": 256, "seed": 7}]


def test_generate_wait_downloads_the_png(
    cli: Invoke, api: FakeApi, s3: FakeS3, token: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.png"
    started = time.monotonic()

    result = cli("generate", "a red fox", "--wait", "-o", str(out), *FAST_POLL, token=token)

    assert result.exit_code == 0, result.output
    (task_id,) = api.tasks
    assert out.read_bytes() == png_for(task_id)
    assert result.stdout.split() == [task_id, str(out)]
    for status in ("QUEUED", "RUNNING", "DONE"):
        assert f"task {task_id}: {status}" in result.stderr
    assert api.tasks[task_id].polls == 3  # QUEUED, RUNNING, DONE
    assert [("Authorization" in h) for h in s3.hits] == [False]
    assert time.monotonic() - started < 10


def test_generate_wait_saves_to_the_task_id_by_default(
    cli: Invoke, api: FakeApi, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = cli("generate", "a red fox", "--wait", *FAST_POLL, token=token)

    assert result.exit_code == 0, result.output
    (task_id,) = api.tasks
    assert (tmp_path / f"{task_id}.png").read_bytes() == png_for(task_id)
    assert result.stdout.split()[-1] == f"{task_id}.png"


def test_generate_wait_on_a_failed_task_prints_the_error_and_exits_1(
    cli: Invoke, api: FakeApi, token: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.png"

    result = cli("generate", "please fail", "--wait", "-o", str(out), *FAST_POLL, token=token)

    assert result.exit_code == 1
    (task_id,) = api.tasks
    assert f"error: task {task_id} failed: CUDA out of memory" in result.stderr
    assert not out.exists()


def test_generate_wait_gives_up_after_timeout(cli: Invoke, token: str) -> None:
    result = cli("generate", "slow one", "--wait", "--timeout", "0.1", *FAST_POLL, token=token)

    assert result.exit_code == 1
    assert "not finished after 0.1 s" in result.stderr


def test_a_field_error_names_the_field(cli: Invoke, token: str) -> None:
    result = cli("generate", "a red fox", "--width", "100", token=token)

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: width: must be a multiple of 8 in 64-2048 (field: width)"
    )


def test_a_full_queue_says_when_to_retry(cli: Invoke, api: FakeApi, token: str) -> None:
    api.queue_full = True

    result = cli("generate", "a red fox", token=token)

    assert result.exit_code == 1
    assert "queue full, retry in 7 s" in result.stderr


def test_a_priority_submit_sends_the_lane(cli: Invoke, api: FakeApi, token: str) -> None:
    result = cli("generate", "a red fox", "--priority", "high", token=token)

    assert result.exit_code == 0, result.stderr
    assert api.submitted == [{"prompt": "a red fox", "priority": "high"}]


def test_a_submit_past_the_active_task_share_says_what_to_do() -> None:
    refused = ApiError(
        429,
        "ACTIVE_TASK_LIMIT",
        "at most 20 active (queued or running) tasks per user",
        field="active_tasks",
        retry_after=10,
    )

    assert describe_error(refused) == (
        "error: too many active tasks; wait for one to finish or cancel one "
        "(at most 20 active (queued or running) tasks per user)"
    )


def test_a_submit_past_a_new_accounts_limit_says_what_to_do() -> None:
    refused = ApiError(
        429,
        "NEW_ACCOUNT_LIMIT",
        "new accounts may have at most 5 active (queued or running) tasks",
        field="active_tasks",
        retry_after=10,
    )

    assert describe_error(refused).startswith(
        "error: too many active tasks; wait for one to finish or cancel one (new accounts"
    )


def test_a_rate_limited_submit_says_when_to_retry() -> None:
    refused = ApiError(
        429, "RATE_LIMITED", "rate limited: at most 20 submits in a burst", retry_after=3
    )

    assert describe_error(refused) == (
        "error: rate limited, retry in 3 s (rate limited: at most 20 submits in a burst)"
    )


# -- auth and connection failures -------------------------------------------------------------


def test_a_refused_token_says_log_in(cli: Invoke) -> None:
    result = cli("tasks", token="expired-or-forged")

    assert result.exit_code == 1
    assert result.stderr.strip() == "error: not logged in or token expired: run `gpuqueue login`"


def test_no_token_at_all_says_log_in_without_asking_the_api(cli: Invoke, api: FakeApi) -> None:
    result = cli("stats")

    assert result.exit_code == 1
    assert "not logged in or token expired: run `gpuqueue login`" in result.stderr
    assert api.seen_auth == []


def test_an_expired_cached_token_says_log_in(cli: Invoke, api: FakeApi, token: str) -> None:
    creds.save(api.url, token, "alice", expires_at=time.time() - 1)

    result = cli("stats")

    assert result.exit_code == 1
    assert "not logged in or token expired" in result.stderr


def test_an_unreachable_api_says_start_the_stack(cli: Invoke) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    for args, token in ((["tasks"], "t"), (["login", "-u", "a", "-p", "b"], None)):
        result = cli(*args, token=token, api_url=url)
        assert result.exit_code == 1
        assert one_line(result.stderr) == (
            f"error: cannot reach {url}: is the stack running (`make up`)?"
        )


def test_a_non_json_error_still_reads_as_one_line(cli: Invoke, api: FakeApi, token: str) -> None:
    api.stats_broken = True

    result = cli("stats", token=token)

    assert result.exit_code == 1
    assert result.stderr.strip() == "error: <html>Bad Gateway</html>"


# -- tasks, task, cancel, stats ---------------------------------------------------------------


def test_tasks_shows_a_table_and_the_next_cursor(cli: Invoke, api: FakeApi, token: str) -> None:
    oldest, middle, newest = (api.add_task("alice", f"prompt {n}") for n in range(3))
    api.add_task("mallory", "not yours")

    first = cli("tasks", "--limit", "2", token=token)

    assert first.exit_code == 0, first.output
    lines = first.stdout.splitlines()
    header = next(line for line in lines if "id" in line.split())
    assert header.split() == ["id", "status", "created", "(UTC)", "prompt"]
    assert f"{newest.task_id} QUEUED 2026-01-01 00:02 prompt 2" in one_line(first.stdout)
    assert middle.task_id in first.stdout
    assert oldest.task_id not in first.stdout
    assert "not yours" not in first.stdout
    assert lines[-1] == "next page: gpuqueue tasks --cursor 2"

    second = cli("tasks", "--limit", "2", "--cursor", "2", token=token)

    assert second.exit_code == 0, second.output
    assert oldest.task_id in second.stdout
    assert newest.task_id not in second.stdout
    assert "next page" not in second.stdout


def test_tasks_with_none(cli: Invoke, token: str) -> None:
    result = cli("tasks", token=token)

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "no tasks"


def test_task_prints_the_json_and_cancel_cancels(cli: Invoke, api: FakeApi, token: str) -> None:
    task = api.add_task("alice", "a red fox")

    expected = task.view()

    shown = cli("task", task.task_id, token=token)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == expected
    task.polls = 0  # the GET moved it on; back to QUEUED

    canceled = cli("cancel", task.task_id, token=token)
    assert canceled.exit_code == 0, canceled.output
    assert canceled.stdout.strip() == f"task {task.task_id}: CANCELED"

    again = cli("cancel", task.task_id, token=token)
    assert again.exit_code == 1
    assert "error: task is CANCELED, not QUEUED" in again.stderr

    missing = cli("task", "no-such-task", token=token)
    assert missing.exit_code == 1
    assert "error: task not found" in missing.stderr


def test_python_dash_m_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLIENT_DIR), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "gpuqueue_client", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout


# -- the client class -------------------------------------------------------------------------


@pytest.fixture
def client(api: FakeApi, token: str) -> GpuqueueClient:
    return GpuqueueClient(api.url, token, timeout=5)


def test_client_wait_reports_every_poll_and_returns_the_final_task(
    client: GpuqueueClient,
) -> None:
    task_id = client.submit_image("a red fox", negative_prompt="blurry", steps=20)["task_id"]
    seen: list[str] = []

    final = client.wait(
        task_id, timeout=10, poll_interval=0.01, on_update=lambda t: seen.append(t["status"])
    )

    assert seen == ["QUEUED", "RUNNING", "DONE"]
    assert final["status"] == "DONE"
    assert final["result_url"] == f"/api/images/{task_id}"


def test_client_wait_times_out(client: GpuqueueClient) -> None:
    task_id = client.submit_image("slow one")["task_id"]
    started = time.monotonic()

    with pytest.raises(TimeoutError, match="still RUNNING"):
        client.wait(task_id, timeout=0.2, poll_interval=0.02)

    assert time.monotonic() - started < 5


def test_client_download_never_sends_the_token_to_s3(api: FakeApi, s3: FakeS3, token: str) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"  # even a session-wide one
    client = GpuqueueClient(api.url, token, session=session, timeout=5)
    task_id = client.submit_image("a red fox")["task_id"]

    with pytest.raises(ApiError) as early:
        client.download_image(task_id)
    assert (early.value.status, early.value.code) == (409, "CONFLICT")

    client.wait(task_id, timeout=10, poll_interval=0.01)
    assert client.download_image(task_id) == png_for(task_id)
    assert len(s3.hits) == 1
    assert "Authorization" not in s3.hits[0]


def test_client_errors_carry_status_code_field_and_retry_after(
    api: FakeApi, client: GpuqueueClient
) -> None:
    with pytest.raises(ApiError) as field_error:
        client.submit_image("x", height=64, width=65)
    assert (field_error.value.status, field_error.value.code) == (400, "VALIDATION_ERROR")
    assert field_error.value.field == "width"

    api.queue_full = True
    with pytest.raises(ApiError) as full:
        client.submit_image("x")
    assert (full.value.status, full.value.retry_after, full.value.code) == (503, 7, "QUEUE_FULL")

    with pytest.raises(ApiError) as gateway:
        GpuqueueClient(api.url, "forged").stats()
    assert (gateway.value.status, gateway.value.code, gateway.value.message) == (
        401,
        None,
        "Unauthorized",
    )

    api.stats_broken = True
    with pytest.raises(ApiError) as html:
        client.stats()
    assert (html.value.status, html.value.code, html.value.message) == (
        502,
        None,
        "<html>Bad Gateway</html>",
    )


def test_client_pages_through_tasks_and_cancels(api: FakeApi, client: GpuqueueClient) -> None:
    ids = [client.submit_image(f"prompt {n}")["task_id"] for n in range(3)]

    page, cursor = client.list_tasks(limit=2)
    assert [t["task_id"] for t in page] == ids[:0:-1]
    assert cursor == "2"
    rest, end = client.list_tasks(limit=2, cursor=cursor)
    assert [t["task_id"] for t in rest] == ids[:1]
    assert end is None

    assert client.cancel(ids[0])["status"] == "CANCELED"
    assert client.stats()["queue_capacity"] == 100
    assert api.submitted[0] == {"prompt": "prompt 0"}


def test_client_register_and_login_keep_the_token(api: FakeApi) -> None:
    client = GpuqueueClient(api.url + "/", timeout=5)

    token = client.register("carol", "long enough")
    assert client.token == token
    assert client.expires_at == pytest.approx(time.time() + 3600, abs=60)
    assert client.login("carol", "long enough") != token
    with pytest.raises(ApiError) as taken:
        client.register("carol", "long enough")
    assert (taken.value.status, taken.value.field) == (409, "username")


def test_credentials_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("GPUQUEUE_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert creds.credentials_path() == tmp_path / "xdg" / "gpuqueue" / "credentials.json"

    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert creds.config_dir() == tmp_path / "home" / ".config" / "gpuqueue"

    monkeypatch.setenv("GPUQUEUE_CONFIG_DIR", str(tmp_path / "explicit"))
    creds.save("http://x/", "tok", "u", None)
    assert creds.load("http://x") == creds.Credentials("tok", "u", None)
    assert stat.S_IMODE((tmp_path / "explicit" / "credentials.json").stat().st_mode) == 0o600


# -- endpoints (operators) --------------------------------------------------------------------


@pytest.fixture
def ops_token(api: FakeApi) -> str:
    return api.issue_token("ops")


def test_endpoints_list_shows_a_table(cli: Invoke, api: FakeApi, ops_token: str) -> None:
    api.add_endpoint(
        "gpu-a",
        capacity=4,
        in_flight=1,
        healthy=True,
        routable=True,
        latency_ewma_ms=123.4,
    )
    api.add_endpoint("gpu-b", state="DRAINING", circuit="OPEN", kind="speech")

    result = cli("endpoints", "list", token=ops_token)

    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "id" in line.split())
    assert one_line(header) == (
        "id kind url state healthy circuit in-flight/capacity latency (EWMA)"
    )
    text = one_line(result.stdout)
    assert "gpu-a image http://gpu-a.gpu.internal:8000 ACTIVE yes CLOSED 1/4 123 ms" in text
    assert "gpu-b speech http://gpu-b.gpu.internal:8000 DRAINING no OPEN 0/1 -" in text


def test_endpoints_list_by_kind_and_with_none(cli: Invoke, api: FakeApi, ops_token: str) -> None:
    api.add_endpoint("gpu-a")

    assert cli("endpoints", "list", "--kind", "speech", token=ops_token).stdout.strip() == (
        "no endpoints"
    )
    assert "gpu-a" in cli("endpoints", "list", "--kind", "image", token=ops_token).stdout


def test_endpoints_as_a_non_operator_is_refused(cli: Invoke, api: FakeApi, token: str) -> None:
    api.add_endpoint("gpu-a")

    result = cli("endpoints", "list", token=token)

    assert result.exit_code == 1
    assert "error: operators only" in result.stderr


def test_endpoints_put_adds_then_changes_only_the_options_given(
    cli: Invoke, api: FakeApi, ops_token: str
) -> None:
    missing = cli("endpoints", "put", "gpu-new", "--capacity", "2", token=ops_token)
    assert missing.exit_code == 1
    assert "--url and --kind are needed" in missing.stderr
    assert api.endpoint_puts == []

    new = ["--url", "http://10.0.0.5:8000", "--kind", "image"]
    added = cli("endpoints", "put", "gpu-new", *new, token=ops_token)
    assert added.exit_code == 0, added.output
    assert added.stdout.startswith("added endpoint gpu-new: ACTIVE, image http://10.0.0.5:8000")
    assert api.endpoint_puts[-1] == {"url": "http://10.0.0.5:8000", "kind": "image"}

    api.endpoints["gpu-new"]["state"] = "DRAINING"
    changed = cli("endpoints", "put", "gpu-new", "--capacity", "4", token=ops_token)
    assert changed.exit_code == 0, changed.output
    # A PUT replaces the configuration: what was not given is sent as it is now.
    assert api.endpoint_puts[-1] == {
        "url": "http://10.0.0.5:8000",
        "kind": "image",
        "protocol": "openai",
        "capacity": 4,
        "weight": 1,
        "state": "DRAINING",
    }
    assert "changed endpoint gpu-new: DRAINING" in changed.stdout

    active = cli("endpoints", "put", "gpu-new", "--state", "active", token=ops_token)
    assert active.exit_code == 0, active.output
    assert api.endpoint_puts[-1]["state"] == "ACTIVE"


def test_endpoints_put_names_where_the_key_is_kept_and_keeps_it_across_changes(
    cli: Invoke, api: FakeApi, ops_token: str
) -> None:
    new = ["--url", "http://10.0.0.5:8000", "--kind", "image"]
    secret = ["--credentials-secret", "prod/gpu/gpu-7"]

    added = cli("endpoints", "put", "gpu-7", *new, *secret, token=ops_token)
    assert added.exit_code == 0, added.output
    assert api.endpoint_puts[-1]["credentials"] == {"type": "bearer", "secret": "prod/gpu/gpu-7"}
    assert "key from secret prod/gpu/gpu-7 as Authorization: Bearer" in added.stdout

    resized = cli("endpoints", "put", "gpu-7", "--capacity", "2", token=ops_token)
    assert resized.exit_code == 0, resized.output
    assert api.endpoint_puts[-1]["credentials"] == {"type": "bearer", "secret": "prod/gpu/gpu-7"}

    header = ["--credentials-header", "X-Api-Key"]
    as_header = cli("endpoints", "put", "gpu-7", *header, token=ops_token)
    assert as_header.exit_code == 0, as_header.output
    assert api.endpoint_puts[-1]["credentials"] == {
        "type": "header",
        "header": "X-Api-Key",
        "secret": "prod/gpu/gpu-7",
    }
    assert "as X-Api-Key" in as_header.stdout

    parameter = ["--credentials-parameter", "/prod/gpu/gpu-7"]
    moved = cli("endpoints", "put", "gpu-7", *parameter, token=ops_token)
    assert api.endpoint_puts[-1]["credentials"] == {
        "type": "bearer",
        "parameter": "/prod/gpu/gpu-7",
    }
    assert "key from parameter /prod/gpu/gpu-7" in moved.stdout

    removed = cli("endpoints", "put", "gpu-7", "--no-credentials", token=ops_token)
    assert removed.exit_code == 0, removed.output
    assert "credentials" not in api.endpoint_puts[-1]
    assert "no credentials" in removed.stdout


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--no-credentials", "--credentials-secret", "s"], "--no-credentials goes alone"),
        (["--credentials-secret", "s", "--credentials-parameter", "/p"], "not both"),
        (["--credentials-header", "X-Api-Key"], "needs --credentials-secret"),
    ],
)
def test_endpoints_put_refuses_credentials_options_that_do_not_go_together(
    cli: Invoke, api: FakeApi, ops_token: str, options: list[str], says: str
) -> None:
    api.add_endpoint("gpu-a")

    result = cli("endpoints", "put", "gpu-a", *options, token=ops_token)

    assert result.exit_code == 1
    assert says in result.stderr
    assert api.endpoint_puts == []


def test_endpoints_put_refuses_what_the_cli_can_check(cli: Invoke, ops_token: str) -> None:
    result = cli("endpoints", "put", "gpu-1", "--capacity", "0", token=ops_token)

    assert result.exit_code == 2
    assert "capacity" in result.output


def test_endpoints_drain_and_delete(cli: Invoke, api: FakeApi, ops_token: str) -> None:
    api.add_endpoint("gpu-a")

    drained = cli("endpoints", "drain", "gpu-a", token=ops_token)
    assert drained.exit_code == 0, drained.output
    assert drained.stdout.startswith("endpoint gpu-a: DRAINING")

    deleted = cli("endpoints", "delete", "gpu-a", token=ops_token)
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout.strip() == "endpoint gpu-a deleted"
    assert api.endpoints == {}

    again = cli("endpoints", "delete", "gpu-a", token=ops_token)
    assert again.exit_code == 1
    assert "error: endpoint gpu-a not found (field: endpoint_id)" in again.stderr


def test_client_endpoint_calls(api: FakeApi, ops_token: str) -> None:
    client = GpuqueueClient(api.url, ops_token, timeout=5)
    api.add_endpoint("tts-1", kind="speech")

    row = client.put_endpoint("gpu a/1", url="http://h", kind="image", capacity=None)

    assert row["endpoint_id"] == "gpu a/1"  # the id travels as one path segment
    assert api.endpoint_puts == [{"url": "http://h", "kind": "image"}]
    assert [e["endpoint_id"] for e in client.list_endpoints("speech")] == ["tts-1"]
    assert client.drain_endpoint("tts-1")["state"] == "DRAINING"
    assert client.delete_endpoint("tts-1") == {"endpoint_id": "tts-1", "deleted": True}
    with pytest.raises(ApiError) as refused:
        client.put_endpoint("gpu-2", url="http://h", kind="image", capacity=65)
    assert (refused.value.status, refused.value.field) == (400, "capacity")


def test_endpoints_put_sends_a_comfyui_workflow_from_a_file_or_a_checkpoint(
    cli: Invoke, api: FakeApi, ops_token: str, tmp_path: Path
) -> None:
    workflow = {
        "graph": {"6": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}}},
        "prompt_node": "6",
        "output_node": "9",
    }
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    new = ["--url", "http://10.0.0.9:8188", "--kind", "image", "--protocol", "comfyui"]

    added = cli("endpoints", "put", "comfy-1", *new, "--workflow", str(path), token=ops_token)
    assert added.exit_code == 0, added.output
    assert api.endpoint_puts[-1]["workflow"] == workflow

    resized = cli("endpoints", "put", "comfy-1", "--capacity", "2", token=ops_token)
    assert resized.exit_code == 0, resized.output
    assert api.endpoint_puts[-1]["workflow"] == workflow  # kept across changes

    swapped = cli(
        "endpoints", "put", "comfy-1", "--checkpoint", "sdxl.safetensors", token=ops_token
    )
    assert swapped.exit_code == 0, swapped.output
    assert api.endpoint_puts[-1]["workflow"] == {"checkpoint": "sdxl.safetensors"}

    moved = cli("endpoints", "put", "comfy-1", "--protocol", "a1111", token=ops_token)
    assert moved.exit_code == 0, moved.output
    assert "workflow" not in api.endpoint_puts[-1]  # only comfyui endpoints take one

    path.write_text("[1, 2]")
    bad = cli("endpoints", "put", "comfy-1", "--workflow", str(path), token=ops_token)
    assert bad.exit_code == 1
    assert "a JSON object of graph and node ids" in bad.stderr
