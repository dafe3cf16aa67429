"""An HTTP POST bounded by a deadline for the whole call, not for each read.

`requests`' read timeout bounds each socket read. A GPU server that sends its answer a few
bytes at a time, each piece within the timeout, keeps a call going long past it: past the
slot's lease, whose end lets another call onto the same GPU (capacity exceeded). Here the
body is read in pieces, each read bounded by what is left of the call's time.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

READ_CHUNK_BYTES = 1 << 16


class CallDeadlineExceeded(requests.ReadTimeout):
    """The whole call took longer than its deadline (a `requests` timeout, so code that
    handles a read timeout handles this one)."""


def post_within(
    session: requests.Session,
    url: str,
    *,
    seconds: float,
    connect_seconds: float,
    **kwargs: Any,
) -> requests.Response:
    """POST and read the whole answer within `seconds` of the start (connect included)."""
    deadline = time.monotonic() + seconds
    connect = min(connect_seconds, seconds)
    response = session.post(url, timeout=(connect, seconds), stream=True, **kwargs)
    try:
        response._content = _read_body(response, deadline, seconds)
    finally:
        response.close()
    return response


def _read_body(response: requests.Response, deadline: float, seconds: float) -> bytes:
    raw = response.raw
    sock = _socket_of(raw)
    chunks: list[bytes] = []
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


def _socket_of(raw: Any) -> socket.socket | None:
    connection = getattr(raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None
