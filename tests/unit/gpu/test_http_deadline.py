"""`request_within` against a raw local socket server that answers in ways a well-behaved
HTTP server does not: a Content-Length that is not a number, a body cut short by a closed
connection, a body that stops coming. Each must end as a bounded, classified error (or a
bounded read), never a short answer taken for a whole one or a call past its deadline."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from gpuqueue.gpu.http_deadline import AnswerOverLimit, CallDeadlineExceeded, request_within


@contextmanager
def raw_server(answer: bytes, *, then_hang: bool = False) -> Iterator[str]:
    """Answers one request with `answer` verbatim, then closes (or holds the connection open,
    silent, until the test ends)."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            # Read the request's body too: closing on unread bytes would send a reset.
            headers, body = request.split(b"\r\n\r\n", 1)
            length = re.search(rb"(?i)content-length: *(\d+)", headers)
            while length and len(body) < int(length[1]):
                body += connection.recv(4096)
            connection.sendall(answer)
            if then_hang:
                done.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/sdapi/v1/txt2img"
    finally:
        done.set()
        thread.join(5)
        listener.close()


def head(length: str) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def call(url: str, **kwargs: object) -> requests.Response:
    return request_within(
        requests.Session(), "POST", url, seconds=5.0, connect_seconds=1.0, json={}, **kwargs
    )


def test_an_unusable_content_length_is_read_to_the_end_of_the_connection() -> None:
    body = b'{"images": ["iVBORw0KGgo="]}'
    told: list[int | None] = []

    def on_answer(size: int | None, seconds_left: float) -> int | None:
        told.append(size)
        return None

    with raw_server(head("many") + body) as url:
        answer = call(url, on_answer=on_answer)

    assert answer.content == body
    assert told == [None]  # no size to reserve for: the caller reserves for its limit


def test_an_unusable_content_length_still_holds_the_answer_to_its_limit() -> None:
    with raw_server(head("many") + b"x" * 5000) as url, pytest.raises(AnswerOverLimit):
        call(url, max_bytes=1000)


def test_a_connection_closed_before_the_announced_body_is_a_connection_error() -> None:
    with (
        raw_server(head("1000") + b'{"images": ["iVBOR') as url,
        pytest.raises(requests.ConnectionError),
    ):
        call(url)


def test_a_server_silent_midway_through_its_answer_is_a_timeout_at_the_deadline() -> None:
    started = time.monotonic()

    with (
        raw_server(head("1000") + b'{"images": [', then_hang=True) as url,
        pytest.raises(CallDeadlineExceeded, match=r"longer than 0\.5s"),
    ):
        request_within(requests.Session(), "POST", url, seconds=0.5, connect_seconds=1.0, json={})

    assert 0.5 <= time.monotonic() - started < 3.0
