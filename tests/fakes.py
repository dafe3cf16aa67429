"""Stand-ins several test files share: a clock a test moves by hand, a local Lambda function
that records what it is invoked with, and an HTTP server a fake API or S3 answers on. One-off
fakes stay in their test file."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gpuqueue.intake.rate_limiter import RateLimiter
from gpuqueue_local.lambda_runtime import InvocationResult

# A fixed instant (2027): what an epoch-seconds clock reads in a test unless it says.
NOW = 1_800_000_000.0


class FakeClock:
    """A clock (`clock()` -> seconds) that stands still at `now` until the test moves it."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def stop_rate_limiter_clocks(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Every RateLimiter built from here on (a handler's too) reads the returned clock, set
    to the time now: a loaded machine taking seconds between two calls must not refill a
    bucket under a test's expectations."""
    clock = FakeClock(time.time())
    build = RateLimiter.__init__

    def with_clock(self: RateLimiter, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **{**kwargs, "clock": clock})

    monkeypatch.setattr(RateLimiter, "__init__", with_clock)
    return clock


@dataclass
class FakeSpec:
    """The part of a FunctionSpec the local gateways read."""

    timeout_seconds: float = 10.0


@dataclass
class RecordingFunction:
    """A FunctionRuntime's surface (`invoke`, `spec`): answers `result` (by default a 200
    with an empty JSON body) and keeps each event with the timeout it was given, from any
    thread."""

    result: InvocationResult = field(
        default_factory=lambda: InvocationResult(ok=True, payload={"statusCode": 200, "body": "{}"})
    )
    spec: FakeSpec = field(default_factory=FakeSpec)
    calls: list[tuple[Any, float | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        with self._lock:
            self.calls.append((event, timeout_seconds))
        return self.result

    @property
    def events(self) -> list[Any]:
        with self._lock:
            return [event for event, _ in self.calls]

    @property
    def event(self) -> Any:
        """The one event it was invoked with."""
        events = self.events
        assert len(events) == 1, f"expected one invocation, got {len(events)}"
        return events[0]


# --- a local HTTP server for a fake API or S3 ----------------------------------------------

# What a fake answers: status, headers, body.
Reply = tuple[int, dict[str, str], bytes]


def reply(status: int, body: object, headers: dict[str, str] | None = None) -> Reply:
    """A JSON answer."""
    return (
        status,
        {"Content-Type": "application/json", **(headers or {})},
        json.dumps(body).encode(),
    )


@dataclass(frozen=True)
class Request:
    """A request the server got, as a fake reads it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def json(self) -> dict[str, Any]:
        loaded = json.loads(self.body or b"{}")
        assert isinstance(loaded, dict)
        return loaded

    def form(self) -> dict[str, EmailMessage]:
        """A multipart/form-data body's parts, by name."""
        content_type = self.headers.get("Content-Type", "")
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        assert isinstance(message, EmailMessage)
        parts: dict[str, EmailMessage] = {}
        for part in message.iter_parts():
            assert isinstance(part, EmailMessage)
            name = part.get_param("name", header="content-disposition")
            assert isinstance(name, str)
            parts[name] = part
        return parts


@contextmanager
def serve(handle: Callable[[Request], Reply]) -> Iterator[str]:
    """A ThreadingHTTPServer on 127.0.0.1:0 answering with `handle`; yields its base URL.
    A chunked body is refused (501), as S3 refuses it: presigned PUTs need Content-Length."""

    class Handler(BaseHTTPRequestHandler):
        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                status, headers, payload = 501, {}, b"<Error><Code>NotImplemented</Code></Error>"
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:  # the client gave up mid-body: nothing to answer
                    self.close_connection = True
                    return
                request = Request(
                    method=self.command,
                    path=url.path,
                    query=parse_qs(url.query),
                    headers=self.headers,
                    body=body,
                )
                status, headers, payload = handle(request)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _dispatch

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a line per request on stderr otherwise

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class MetricsRecorder:
    """Powertools Metrics' add_metric, recording the names added."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def add_metric(self, *, name: str, unit: Any, value: float) -> None:
        self.added.append(name)


class RowTable:
    """put_item and get_item on rows kept by task id: what TaskStore's create and get do."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def put_item(self, *, Item: dict[str, Any], **_: Any) -> None:
        self.rows[Item["task_id"]] = Item

    def get_item(self, *, Key: dict[str, str], **_: Any) -> dict[str, Any]:
        row = self.rows.get(Key["task_id"])
        return {"Item": row} if row is not None else {}
