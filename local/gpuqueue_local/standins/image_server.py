"""Stand-in GPU image-generation HTTP server for tests and the local stack.

It speaks two protocols real GPU endpoints use:

* ``POST /v1/images/generations`` (OpenAI-compatible, ``b64_json`` only)
* ``POST /sdapi/v1/txt2img`` (AUTOMATIC1111-style), with A1111's ``GET /sdapi/v1/progress``,
  ``POST /sdapi/v1/interrupt`` and ``POST /internal/progress`` (see a1111_state: one job at
  a time behind a queue lock, ``latency_s`` spread over the request's ``steps``)

and renders a small deterministic PNG instead of running a model.  Behaviour that a
real GPU box exhibits under stress (latency, failures, hangs, saturation, bad health)
is injected through :class:`ImageServerKnobs`, which can be changed at run time either
through the Python API or ``POST /knobs``.

Extra routes for tests: ``GET /health``, ``GET /stats``, ``POST /reset-stats``,
``GET|POST /knobs``.

Run standalone::

    python -m gpuqueue_local.standins.image_server --port 8001 --latency 2 --capacity 2
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import io
import json
import random
import re
import select
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final

from PIL import Image, ImageDraw, ImageFont

from gpuqueue_local.standins.a1111_state import A1111State, create_task_id
from gpuqueue_local.standins.fault_knobs import (
    CONTROL_PATHS,
    HANG_BOUND_S,
    FaultKnobs,
    as_int,
    discard_body,
    drip_all_but_last,
    is_authorized,
    public_knobs,
    send_last_piece,
)
from gpuqueue_local.standins.serving import BackgroundServer

__all__ = [
    "HANG_BOUND_S",
    "MAX_SIDE",
    "MIN_SIDE",
    "ImageServer",
    "ImageServerKnobs",
    "main",
    "render_png",
]

MIN_SIDE: Final = 64
MAX_SIDE: Final = 2048
# How often a hanging handler re-checks stop / client disconnect / the hang knob.
_HANG_TICK_S: Final = 0.05
_MAX_BODY_BYTES: Final = 1 << 20
_SIZE_RE: Final = re.compile(r"(\d{1,5})x(\d{1,5})")
_OPENAI_PATH: Final = "/v1/images/generations"
_A1111_PATH: Final = "/sdapi/v1/txt2img"
_A1111_PROGRESS: Final = "/sdapi/v1/progress"
_A1111_INTERRUPT: Final = "/sdapi/v1/interrupt"
_A1111_TASK_PROGRESS: Final = "/internal/progress"
_PREVIEW_SIDE: Final = 64
_MAX_N: Final = 4
_MAX_STEPS: Final = 500


@dataclass
class ImageServerKnobs(FaultKnobs):
    """Fault-injection knobs of this stand-in (see fault_knobs.FaultKnobs)."""

    # A1111 serves `POST /internal/progress` (per-task progress) only with its web UI; an
    # API-only server (`--nowebui`) answers 404 there: False plays that one.
    task_progress_route: bool = True


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Loading the font is the slowest part of a small render; cache per size.
    return ImageFont.load_default(size=size)


def _derived_seed(prompt: str) -> int:
    # "No seed" must still be deterministic so repeated test runs compare equal.
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")


def render_png(prompt: str, seed: int, width: int, height: int) -> bytes:
    """Render a deterministic PNG of exactly ``width`` x ``height`` for (prompt, seed)."""
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"width and height must be in {MIN_SIDE}..{MAX_SIDE}")
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    background = (digest[0], digest[1], digest[2])
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)

    # Four shapes, 7 digest bytes each (3 colour + 4 geometry): 3 + 28 <= 32 bytes.
    for i in range(4):
        b = digest[3 + 7 * i : 10 + 7 * i]
        colour = (b[0], b[1], b[2])
        x0, x1 = sorted((b[3] * (width - 1) // 255, b[4] * (width - 1) // 255))
        y0, y1 = sorted((b[5] * (height - 1) // 255, b[6] * (height - 1) // 255))
        if b[3] & 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)

    # Draw the prompt so a human looking at a test artefact can tell images apart.
    font_size = max(8, min(width, height) // 20)
    font = _font(font_size)
    margin = max(2, font_size // 2)
    char_w = max(1.0, draw.textlength("n", font=font))
    per_line = max(1, int((width - 2 * margin) / char_w))
    line_h = font_size + max(2, font_size // 4)
    max_lines = max(1, (height - 2 * margin) // line_h)
    lines = textwrap.wrap(prompt, width=per_line, max_lines=max_lines, placeholder="...")
    for row, line in enumerate(lines):
        draw.text(
            (margin, margin + row * line_h),
            line,
            font=font,
            fill=(255, 255, 255),
            stroke_width=max(1, font_size // 12),
            stroke_fill=(0, 0, 0),
        )

    buf = io.BytesIO()
    # Low compression: we care about speed, not size; the output stays deterministic.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _b64_png(prompt: str, seed: int, width: int, height: int) -> str:
    return base64.b64encode(render_png(prompt, seed, width, height)).decode("ascii")


# --------------------------------------------------------------------------- request parsing


class _BadRequest(Exception):
    pass


@dataclass(frozen=True)
class _GenRequest:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int  # effective seed used for rendering
    n: int
    raw_seed: int | None  # seed as sent (None when absent)
    task_id: str | None = None  # A1111's force_task_id


def _opt_int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    try:
        return as_int(key, value, lo, hi)
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None


def _common_fields(body: Mapping[str, Any]) -> tuple[str, str, int, int | None]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRequest("prompt is required and must be a non-empty string")
    negative = body.get("negative_prompt")
    if negative is None:
        negative = ""
    if not isinstance(negative, str):
        raise _BadRequest("negative_prompt must be a string")
    steps = _opt_int(body, "steps", 1, _MAX_STEPS)
    seed = _opt_int(body, "seed", -(2**63), 2**63 - 1)
    return prompt, negative, 20 if steps is None else steps, seed


def _parse_openai(body: Mapping[str, Any]) -> _GenRequest:
    prompt, negative, steps, seed = _common_fields(body)
    n = _opt_int(body, "n", 1, _MAX_N)
    size = body.get("size", "1024x1024")
    match = _SIZE_RE.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise _BadRequest("size must look like 'WIDTHxHEIGHT', e.g. '512x512'")
    width, height = int(match.group(1)), int(match.group(2))
    _check_side("size width", width)
    _check_side("size height", height)
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise _BadRequest("only response_format 'b64_json' is supported")
    return _GenRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        seed=_derived_seed(prompt) if seed is None else seed,
        n=1 if n is None else n,
        raw_seed=seed,
    )


def _parse_a1111(body: Mapping[str, Any]) -> _GenRequest:
    prompt, negative, steps, seed = _common_fields(body)
    width = _opt_int(body, "width", MIN_SIDE, MAX_SIDE)
    height = _opt_int(body, "height", MIN_SIDE, MAX_SIDE)
    # A1111 treats seed -1 as "random"; we derive one from the prompt to stay deterministic.
    effective = _derived_seed(prompt) if seed is None or seed == -1 else seed
    task_id = body.get("force_task_id")
    if task_id is not None and not isinstance(task_id, str):
        raise _BadRequest("force_task_id must be a string")
    return _GenRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=512 if width is None else width,
        height=512 if height is None else height,
        steps=steps,
        seed=effective,
        n=1,
        raw_seed=seed,
        task_id=task_id or None,
    )


def _check_side(name: str, value: int) -> None:
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise _BadRequest(f"{name} must be between {MIN_SIDE} and {MAX_SIDE}")


# --------------------------------------------------------------------------- HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    # Daemon handler threads: a hung call must never keep the interpreter alive.
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: ImageServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, hang tests) is expected, not an error.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


def _still_hanging(knobs: ImageServerKnobs) -> bool:
    """Read the knob afresh (a test may clear it while a call hangs)."""
    return knobs.hang


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "gpuqueue-image-standin/1.0"
    # HTTP/1.0: one request per connection, so a closed socket reliably means the client left.
    protocol_version = "HTTP/1.0"

    @property
    def owner(self) -> ImageServer:
        return self.server.owner

    def log_message(self, format: str, *args: Any) -> None:
        # Per-request stderr noise drowns test output; only log when asked to.
        if self.owner.verbose:
            super().log_message(format, *args)

    # -- routing

    def _refused(self, path: str) -> bool:
        """Answer 401 (and say so) when the credential knob wants a key this lacks."""
        if path in CONTROL_PATHS or is_authorized(self.owner.knobs, self.headers):
            return False
        self.owner._record_refused()
        # Read what the client sends first: closing on an unread body could reset the
        # connection before it reads the 401.
        discard_body(self.rfile, self.headers)
        self._send_json(401, _error("invalid or missing API key", "authentication_error"))
        return True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._refused(path):
            return
        if path == "/health":
            self._health()
        elif path == "/stats":
            self._send_json(200, self.owner.stats())
        elif path == "/knobs":
            self._send_json(200, public_knobs(self.owner.knobs))
        elif path == _A1111_PROGRESS:
            self._a1111_progress()
        else:
            self._send_json(404, _error(f"no route for GET {path}", "not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._refused(path):
            return
        if path in (_OPENAI_PATH, _A1111_PATH):
            self._generate(path)
        elif path == _A1111_INTERRUPT:
            discard_body(self.rfile, self.headers)
            self.owner.a1111.interrupt()
            self._send_json(200, {})
        elif path == _A1111_TASK_PROGRESS and self.owner.knobs.task_progress_route:
            self._a1111_task_progress()
        elif path == "/reset-stats":
            self.owner.reset_stats()
            self._send_json(200, self.owner.stats())
        elif path == "/knobs":
            self._post_knobs()
        elif path == "/shutdown":
            # Fault injection from another process: die like a crashed GPU server (the port
            # then refuses connections). Answer first, stop from another thread.
            self._send_json(200, {"status": "stopping"})
            threading.Thread(target=self.owner.stop, daemon=True).start()
        else:
            self._send_json(404, _error(f"no route for POST {path}", "not_found"))

    # -- routes

    def _health(self) -> None:
        if not self.owner.knobs.healthy:
            self._send_json(503, {"status": "down"})
            return
        stats = self.owner.stats()
        self._send_json(
            200,
            {
                "status": "ok",
                "in_flight": stats["in_flight"],
                "max_in_flight": stats["max_in_flight"],
                "calls": stats["calls"],
            },
        )

    def _a1111_progress(self) -> None:
        # A1111 has no health route: its progress route is what a prober reads, so the
        # `healthy` knob makes it fail like /health does.
        if not self.owner.knobs.healthy:
            self._send_json(503, {"status": "down"})
            return
        query = self.path.partition("?")[2]
        skip = "skip_current_image=true" in query.lower().split("&")
        self._send_json(200, self.owner.a1111.progress(skip_current_image=skip))

    def _a1111_task_progress(self) -> None:
        try:
            body = self._read_json_object()
        except _BadRequest as exc:
            self._send_json(422, {"detail": str(exc)})
            return
        id_task = body.get("id_task")
        if id_task is not None and not isinstance(id_task, str):
            self._send_json(422, {"detail": "id_task must be a string"})
            return
        self._send_json(200, self.owner.a1111.task_progress(id_task))

    def _post_knobs(self) -> None:
        try:
            body = self._read_json_object()
            knobs = self.owner.set_knobs(body)
        except (_BadRequest, ValueError) as exc:
            self._send_json(400, _error(str(exc)))
            return
        self._send_json(200, public_knobs(knobs))

    def _generate(self, path: str) -> None:
        owner = self.owner
        try:
            body = self._read_json_object()
            req = _parse_openai(body) if path == _OPENAI_PATH else _parse_a1111(body)
        except _BadRequest as exc:
            owner._record_call(None)
            self._send_json(400, _error(str(exc)))
            return

        admitted, fail = owner._enter(req.prompt)
        if not admitted:
            self._send_json(429, {"error": {"message": "busy"}})
            return
        try:
            images, stopped = True, False
            if path == _A1111_PATH:
                end = owner.a1111.run_job(
                    req.task_id or create_task_id("txt2img"),
                    req.steps,
                    latency_s=owner.knobs.latency_s,
                    stop=owner._stop_event,
                    preview=functools.partial(
                        _b64_png, req.prompt, req.seed, _PREVIEW_SIDE, _PREVIEW_SIDE
                    ),
                )
                # Interrupted before its first step: A1111 answers with no image at all.
                images = end is not None and (end.steps_run > 0 or not end.interrupted)
                stopped = end is None
            if stopped or not self._wait_before_answer(latency=path != _A1111_PATH):
                # Stopped, client gone, or hang bound hit: drop the connection like a dead GPU.
                self.close_connection = True
                return
            status = 200
            payload: dict[str, Any]
            if fail:
                status = owner.knobs.fail_status
                payload = {"error": {"message": "injected failure"}}
            elif path == _OPENAI_PATH:
                payload = _openai_response(req)
            else:
                payload = _a1111_response(req, images=images)
            last_piece = None
            if owner.knobs.drip_s > 0:
                last_piece = drip_all_but_last(
                    self,
                    status,
                    "application/json",
                    json.dumps(payload).encode(),
                    interval=owner.knobs.drip_s,
                    stop=owner._stop_event,
                )
                if last_piece is None:
                    return
        finally:
            # Leave in_flight before answering so a client that got its reply sees it released.
            owner._exit()
        if last_piece is not None:
            send_last_piece(self, last_piece)
        else:
            self._send_json(status, payload)

    def _wait_before_answer(self, *, latency: bool = True) -> bool:
        """Apply latency/hang knobs (the latency unless the call already spent it). False
        means: do not answer at all."""
        owner = self.owner
        latency_s = owner.knobs.latency_s if latency else 0.0
        # Event.wait instead of time.sleep so stop() interrupts the delay at once.
        if latency_s > 0 and owner._stop_event.wait(latency_s):
            return False
        if not owner.knobs.hang:
            return True
        deadline = time.monotonic() + HANG_BOUND_S
        # Re-check the knob each tick so tests can release hung calls by clearing `hang`.
        while _still_hanging(owner.knobs):
            if owner._stop_event.wait(_HANG_TICK_S):
                return False
            if self._peer_closed() or time.monotonic() >= deadline:
                return False
        return True

    def _peer_closed(self) -> bool:
        # The request is fully read, so a readable socket with no data means EOF (client left).
        conn: socket.socket = self.connection
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            return conn.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- I/O helpers

    def _read_json_object(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _BadRequest("invalid Content-Length") from None
        if length < 0 or length > _MAX_BODY_BYTES:
            raise _BadRequest("request body missing or too large")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _BadRequest("request body must be valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        return body

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError):
            pass  # client already gone; nothing useful to do


def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def _openai_response(req: _GenRequest) -> dict[str, Any]:
    # n > 1 uses consecutive seeds so each image differs but stays reproducible.
    data = [
        {
            "b64_json": _b64_png(req.prompt, req.seed + i, req.width, req.height),
            "revised_prompt": req.prompt,
        }
        for i in range(req.n)
    ]
    return {"created": int(time.time()), "data": data}


def _a1111_response(req: _GenRequest, *, images: bool = True) -> dict[str, Any]:
    parameters = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "seed": -1 if req.raw_seed is None else req.raw_seed,
    }
    info = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "seed": req.seed,
        "all_seeds": [req.seed],
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "sd_model_name": "standin",
    }
    return {
        "images": [_b64_png(req.prompt, req.seed, req.width, req.height)] if images else [],
        "parameters": parameters,
        "info": json.dumps(info),
    }


# --------------------------------------------------------------------------- public API


class ImageServer(BackgroundServer[ImageServerKnobs]):
    """In-process stand-in GPU server; bind happens in ``__init__`` so ``port`` is known early."""

    name = "image-server"

    def __init__(
        self,
        port: int = 0,
        knobs: ImageServerKnobs | None = None,
        host: str = "127.0.0.1",
        *,
        verbose: bool = False,
    ) -> None:
        self.knobs = knobs if knobs is not None else ImageServerKnobs()
        self.verbose = verbose
        self._host = host
        self._init_serving()
        self._calls = 0
        self._in_flight = 0
        self._max_in_flight = 0
        # Integral of in_flight over time: slot-seconds spent generating (utilisation).
        self._busy_slot_seconds = 0.0
        self._changed_at = time.monotonic()
        # (wall-clock time, calls in flight from then): where a run's GPU time went.
        self._in_flight_changes: list[tuple[float, int]] = []
        self._prompts: list[str] = []
        self.a1111 = A1111State()
        self._httpd = _HTTPServer((host, port), self)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._calls,
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "busy_slot_seconds": round(self._busy_time(), 3),
                "prompts": list(self._prompts),
                "refused": self._refused,
                "in_flight_changes": [[at, n] for at, n in self._in_flight_changes],
                "a1111": self.a1111.stats(),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._calls = 0
            self._refused = 0
            self._prompts.clear()
            # Calls still running keep their in_flight slot; the peak restarts from there.
            self._max_in_flight = self._in_flight
            self._busy_time()
            self._busy_slot_seconds = 0.0
            self._in_flight_changes.clear()
        self.a1111.reset_stats()

    def set_knobs(self, changes: Mapping[str, object]) -> ImageServerKnobs:
        """As every stand-in's, plus this one's own knob (validated here, all-or-nothing)."""
        changes = dict(changes)
        own = {}
        if "task_progress_route" in changes:
            value = changes.pop("task_progress_route")
            if not isinstance(value, bool):
                raise ValueError("task_progress_route must be a boolean")
            own["task_progress_route"] = value
        knobs = super().set_knobs(changes)
        with self._lock:
            for name, value in own.items():
                setattr(knobs, name, value)
        return knobs

    # -- internal bookkeeping used by the handler

    def _record_call(self, prompt: str | None) -> None:
        with self._lock:
            self._calls += 1
            if prompt is not None:
                self._prompts.append(prompt)

    def _enter(self, prompt: str) -> tuple[bool, bool]:
        """Count a valid generation call; returns (admitted, should_fail)."""
        with self._lock:
            self._calls += 1
            self._prompts.append(prompt)
            knobs = self.knobs
            if knobs.capacity and self._in_flight >= knobs.capacity:
                return False, False
            self._busy_time()
            self._in_flight += 1
            self._in_flight_changes.append((time.time(), self._in_flight))
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            if knobs.failure_seed != self._rng_seed:
                # Knob mutated directly on the dataclass: pick up the new seed.
                self._rng_seed = knobs.failure_seed
                self._rng = random.Random(self._rng_seed)
            # Draw on every admitted call so the failure pattern depends only on call order.
            fail = self._rng.random() < knobs.failure_rate
            return True, fail

    def _exit(self) -> None:
        with self._lock:
            self._busy_time()
            self._in_flight -= 1
            self._in_flight_changes.append((time.time(), self._in_flight))

    def _busy_time(self) -> float:
        """Bring the busy integral up to now (call with the lock held) and return it."""
        now = time.monotonic()
        self._busy_slot_seconds += self._in_flight * (now - self._changed_at)
        self._changed_at = now
        return self._busy_slot_seconds


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stand-in GPU image-generation server.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per generation")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--failure-seed", type=int, default=None)
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--capacity", type=int, default=0, help="0 = unlimited")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--unhealthy", action="store_true")
    parser.add_argument(
        "--auth-token",
        default=None,
        help="require this API key on every call and /health (401 without it)",
    )
    parser.add_argument(
        "--auth-header",
        default="Authorization",
        help="where the key goes: Authorization (as 'Bearer <key>', the default) or a header "
        "such as X-Api-Key",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    server = ImageServer(port=args.port, verbose=args.verbose)
    try:
        server.set_knobs(
            {
                "latency_s": args.latency,
                "failure_rate": args.failure_rate,
                "failure_seed": args.failure_seed,
                "fail_status": args.fail_status,
                "capacity": args.capacity,
                "hang": args.hang,
                "healthy": not args.unhealthy,
                "auth_token": args.auth_token,
                "auth_header": args.auth_header,
            }
        )
    except ValueError as exc:
        server.stop()
        parser.error(str(exc))

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    server.start()
    print(f"image-server listening on {server.url}", flush=True)
    try:
        # Timed waits keep the main thread responsive to signals on every platform.
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
