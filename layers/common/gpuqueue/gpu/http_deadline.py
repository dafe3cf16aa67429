"""An HTTP POST (or PUT) bounded by a deadline for the whole call, not for each read.

`requests`' read timeout bounds each socket read. A GPU server that sends its answer a few
bytes at a time, each piece within the timeout, keeps a call going long past it: past the
slot's lease, whose end lets another call onto the same GPU (capacity exceeded). Here the
body is read in pieces, each read bounded by what is left of the call's time.

The answer is bounded in size too (`max_bytes`, decoded: a compressed answer is measured as
it unpacks), and a caller that shares its memory with other calls learns the answer's size
before its body is read (`on_answer`), to reserve room for it (memory_budget.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from gpuqueue.gpu.memory_budget import MemoryWaitExceeded

READ_CHUNK_BYTES = 1 << 16


class CallDeadlineExceeded(requests.ReadTimeout):
    """The whole call took longer than its deadline (a `requests` timeout, so code that
    handles a read timeout handles this one)."""


class AnswerOverLimit(requests.RequestException):
    """The answer is larger than `max_bytes` (no well-behaved server sends that much)."""


def post_within(
    session: requests.Session,
    url: str,
    *,
    seconds: float,
    connect_seconds: float,
    max_bytes: int | None = None,
    on_answer: Callable[[int | None, float], int | None] | None = None,
    method: str = "POST",
    **kwargs: Any,
) -> requests.Response:
    """POST (or `method`: Cog creates a prediction with a PUT) and read the whole answer
    within `seconds` of the start (connect included).

    `on_answer(size, seconds_left)` is called once the answer's headers are in, before its
    body is read, with its Content-Length (None when it has none usable: a compressed or
    chunked answer); it may wait (for memory) within `seconds_left`, and returns the most
    the body may be (None: `max_bytes`)."""
    deadline = time.monotonic() + seconds
    connect = min(connect_seconds, seconds)
    send = session.post if method == "POST" else getattr(session, method.lower())
    response = send(url, timeout=(connect, seconds), stream=True, **kwargs)
    try:
        size = _announced_size(response, max_bytes)
        if on_answer is not None:
            try:
                max_bytes = on_answer(size, deadline - time.monotonic()) or max_bytes
            except MemoryWaitExceeded as error:
                raise CallDeadlineExceeded(
                    f"no memory free for the answer within {seconds:g}s"
                ) from error
        response._content = _read_body(response, deadline, seconds, max_bytes)
    finally:
        response.close()
    return response


def _announced_size(response: requests.Response, max_bytes: int | None) -> int | None:
    """The body's size as its Content-Length gives it (None: none, or compressed)."""
    length = response.headers.get("Content-Length")
    if length is None or response.headers.get("Content-Encoding", "identity") != "identity":
        return None
    try:
        size = int(length)
    except ValueError:
        return None
    if max_bytes is not None and size > max_bytes:
        raise AnswerOverLimit(f"an answer of {size} bytes (at most {max_bytes} expected)")
    return size


def _read_body(
    response: requests.Response, deadline: float, seconds: float, max_bytes: int | None
) -> bytes:
    raw = response.raw
    sock = _socket_of(raw)
    chunks: list[bytes] = []
    read = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CallDeadlineExceeded(f"the answer took longer than {seconds:g}s")
        if sock is not None:
            sock.settimeout(left)
        try:
            # read1: at most one read from the socket, so `left` bounds it.
            chunk = raw.read1(READ_CHUNK_BYTES, decode_content=True)
        except ReadTimeoutError as error:
            raise CallDeadlineExceeded(f"the answer took longer than {seconds:g}s") from error
        except ProtocolError as error:
            raise requests.ConnectionError(error) from error
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        read += len(chunk)
        if max_bytes is not None and read > max_bytes:
            raise AnswerOverLimit(f"an answer of more than {max_bytes} bytes")


def _socket_of(raw: Any) -> socket.socket | None:
    connection = getattr(raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None
