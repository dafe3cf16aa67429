"""The fault-injection knobs every stand-in GPU server shares, and their validation.

Read on every request, so a change (Python API or `POST /knobs`) applies at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import re
import threading
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler
from io import BufferedIOBase
from typing import Any, Final

# Upper bound for a hanging call, so a forgotten hang can never wedge a process forever.
HANG_BOUND_S: Final = 600.0
# Routes tests and tools drive the stand-in with: never behind the credential knob.
CONTROL_PATHS: Final = frozenset({"/knobs", "/stats", "/reset-stats", "/shutdown"})
_HEADER_NAME: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")


@dataclass
class FaultKnobs:
    latency_s: float = 0.0  # extra delay before answering a call
    failure_rate: float = 0.0  # share of calls answered with ``fail_status``
    failure_seed: int | None = None  # seed for the failure RNG (None = nondeterministic)
    hang: bool = False  # calls block until released/disconnected/stopped
    healthy: bool = True  # False -> GET /health answers 503
    capacity: int = 0  # max concurrent calls, 0 = unlimited; excess gets 429
    fail_status: int = 500  # HTTP status used for injected failures
    # Set: every call and /health need this key (401 otherwise), as a server started with
    # an API key does. Sent as "Authorization: Bearer <key>", or as the value of
    # `auth_header` when that names another header (X-Api-Key, say).
    auth_token: str | None = None
    auth_header: str = "Authorization"
    # A slow-dripping server: a generation's answer is sent in DRIP_PIECES pieces, this many
    # seconds apart (each piece well within a client's read timeout, the whole not).
    drip_s: float = 0.0


def is_authorized(knobs: FaultKnobs, headers: Message[str, str]) -> bool:
    """Whether a request's headers carry the key the knobs ask for (always, when none)."""
    expected = knobs.auth_token
    if expected is None:
        return True
    given = headers.get(knobs.auth_header) or ""
    if knobs.auth_header.lower() == "authorization":
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip()
    return hmac.compare_digest(given.encode(), expected.encode())


def discard_body(stream: BufferedIOBase, headers: Message[str, str], limit: int = 1 << 27) -> None:
    """Read and drop a request body (up to `limit` bytes)."""
    try:
        remaining = min(int(headers.get("Content-Length") or 0), limit)
    except ValueError:
        return
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 16))
        if not chunk:
            return
        remaining -= len(chunk)


def public_knobs(knobs: FaultKnobs) -> dict[str, Any]:
    """The knobs as GET/POST /knobs show them: the key itself is never echoed."""
    shown = dataclasses.asdict(knobs)
    if shown.get("auth_token") is not None:
        shown["auth_token"] = "***"  # noqa: S105 - a mask, not a password
    return shown


def as_float(name: str, value: object, lo: float, hi: float) -> float:
    # bool is an int subclass; reject it so `true` is not silently read as 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return float(value)


def as_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return value


def validate_knob(name: str, value: object) -> object:
    """A JSON value from `POST /knobs` -> the typed knob value, or ValueError."""
    if name in ("latency_s", "drip_s"):
        return as_float(name, value, 0.0, HANG_BOUND_S)
    if name == "failure_rate":
        return as_float(name, value, 0.0, 1.0)
    if name == "failure_seed":
        return None if value is None else as_int(name, value, -(2**63), 2**63 - 1)
    if name in ("hang", "healthy"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if name == "capacity":
        return as_int(name, value, 0, 1_000_000)
    if name == "fail_status":
        return as_int(name, value, 400, 599)
    if name in ("auth_token", "auth_header"):
        return _validate_auth_knob(name, value)
    raise ValueError(f"unknown knob: {name}")


def _validate_auth_knob(name: str, value: object) -> str | None:
    if name == "auth_token":
        if value is None:
            return None
        if not isinstance(value, str) or not value or any(ch in value for ch in "\r\n\0"):
            raise ValueError(f"{name} must be null or a non-empty string without line breaks")
        return value
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"{name} must be an HTTP header name")
    return value


# With the drip_s knob, an answer goes out in this many pieces.
DRIP_PIECES = 10


def drip_all_but_last(
    handler: BaseHTTPRequestHandler,
    status: int,
    content_type: str,
    data: bytes,
    *,
    interval: float,
    stop: threading.Event,
) -> bytes | None:
    """Send the headers and all of `data` but its last piece, `interval` seconds apart (the
    GPU is still busy meanwhile: the call stays in flight); the last piece, to send once the
    call has left in-flight. None if the server stopped or the client left."""
    size = -(-len(data) // DRIP_PIECES)
    pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    last = pieces.pop()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        for piece in pieces:
            handler.wfile.write(piece)
            handler.wfile.flush()
            if stop.wait(interval):
                return None
    except (ConnectionError, TimeoutError):
        return None
    return last


def send_last_piece(handler: BaseHTTPRequestHandler, piece: bytes) -> None:
    with contextlib.suppress(ConnectionError, TimeoutError):  # the client gave up meanwhile
        handler.wfile.write(piece)
