"""Stand-in ComfyUI server: its HTTP and WebSocket API as docs/gpu-servers.md section 1
records it (ComfyUI's server.py, execution.py and main.py), one port for both.

Routes (each also under ``/api``): ``POST/GET /prompt``, ``GET/POST /queue``,
``POST /interrupt``, ``GET /history[/{id}]``, ``GET /view``, ``GET /system_stats`` and
``GET /ws?clientId=`` (events ``status``, ``execution_start``, ``execution_cached``,
``executing``, ``progress``, ``executed``, ``execution_success``, ``execution_error``,
``execution_interrupted``, in ComfyUI's shapes and routing: a prompt's events go to its
``client_id``'s socket; ``status`` and ``execution_interrupted`` to every socket).

One prompt runs at a time (ComfyUI's single executor); the rest wait in a queue ordered by
``number``. It understands the default txt2img graph's nodes (CheckpointLoaderSimple,
CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage/PreviewImage): the
KSampler's steps take ``latency_s / steps`` each (a ``progress`` event per step, an
interrupt seen at the next step), and SaveImage writes the PNG `render_png` draws for the
positive prompt and seed to an in-memory output folder that ``/view`` serves.

Fault knobs (``FaultKnobs``, ``POST /knobs``): ``latency_s`` (a prompt's sampling time),
``failure_rate`` (a prompt fails in its KSampler with an ``execution_error``, as a CUDA
error would), ``hang`` (the sampler stops stepping until cleared; an interrupt still
works), ``healthy`` (False: /system_stats answers 503, as a dying process behind a proxy
would), ``capacity`` (prompts queued or running at most; more get 429, as a proxy in front
would: ComfyUI itself queues without limit), ``auth_token``/``auth_header`` (every route,
the ws handshake included). ``fail_status`` is not used: ComfyUI fails a prompt in its
history, not with an HTTP status.

Run standalone::

    python -m gpuqueue_local.standins.comfyui_server --port 8188 --latency 4
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from gpuqueue_local.standins.fault_knobs import (
    CONTROL_PATHS,
    HANG_BOUND_S,
    FaultKnobs,
    discard_body,
    is_authorized,
    public_knobs,
)
from gpuqueue_local.standins.image_server import MAX_SIDE, MIN_SIDE, render_png
from gpuqueue_local.standins.serving import BackgroundServer

__all__ = ["DEFAULT_CHECKPOINT", "ComfyUIKnobs", "ComfyUIServer", "main"]

DEFAULT_CHECKPOINT: Final = "standin.safetensors"
COMFYUI_VERSION: Final = "0.8.1"
_MAX_BODY_BYTES: Final = 8 << 20
_HANG_TICK_S: Final = 0.05
_WS_PATH: Final = re.compile(rb"^GET /(api/)?ws[ ?]")
_KNOWN_NODES: Final = frozenset(
    {
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "KSampler",
        "VAEDecode",
        "SaveImage",
        "PreviewImage",
    }
)
_OUTPUT_NODES: Final = frozenset({"SaveImage", "PreviewImage"})


class ComfyUIKnobs(FaultKnobs):
    """Fault-injection knobs of this stand-in (see the module's docstring)."""


class _Interrupted(Exception):
    pass


class _NodeFailed(Exception):
    def __init__(self, node_id: str, node_type: str, message: str) -> None:
        super().__init__(message)
        self.node_id, self.node_type, self.message = node_id, node_type, message


@dataclass(order=True)
class _Queued:
    number: float
    prompt_id: str = field(compare=False)
    graph: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)

    def as_item(self) -> list[Any]:
        # ComfyUI's queue tuple (number, prompt_id, prompt, extra_data, outputs_to_execute).
        return [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _validation_error(graph: Any, checkpoints: Sequence[str]) -> dict[str, Any] | None:
    """ComfyUI's 400 body for a graph it would refuse; None when it would queue it."""

    def whole(kind: str, message: str, details: str = "") -> dict[str, Any]:
        error = {"type": kind, "message": message, "details": details, "extra_info": {}}
        return {"error": error, "node_errors": {}}

    if not isinstance(graph, dict) or not graph:
        return whole("no_prompt", "No prompt provided", "No prompt provided")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return whole(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        if node["class_type"] not in _KNOWN_NODES:
            return whole(
                "invalid_prompt",
                f"Cannot execute because node {node['class_type']} does not exist.",
                f"Node ID '#{node_id}'",
            )
    outputs = [i for i, n in graph.items() if n["class_type"] in _OUTPUT_NODES]
    if not outputs:
        return whole("prompt_no_outputs", "Prompt has no outputs")
    node_errors: dict[str, Any] = {}
    for node_id, node in graph.items():
        inputs = node.get("inputs") or {}
        if node["class_type"] == "CheckpointLoaderSimple":
            name = inputs.get("ckpt_name")
            if name not in checkpoints:
                node_errors[node_id] = {
                    "errors": [
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"ckpt_name: '{name}' not in {list(checkpoints)}",
                            "extra_info": {"input_name": "ckpt_name", "received_value": name},
                        }
                    ],
                    "dependent_outputs": outputs,
                    "class_type": node["class_type"],
                }
    if node_errors:
        details = "; ".join(e["errors"][0]["details"] for e in node_errors.values())
        body = whole(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
        )
        body["node_errors"] = node_errors
        return body
    return None


def _linked(graph: Mapping[str, Any], node: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    link = (node.get("inputs") or {}).get(name)
    if isinstance(link, list) and link and str(link[0]) in graph:
        return cast(Mapping[str, Any], graph[str(link[0])])
    return {}


@dataclass(frozen=True)
class _Render:
    """What the graph's KSampler draws for an output node."""

    sampler_id: str | None
    prompt: str
    seed: int
    steps: int
    width: int
    height: int


def _render_of(graph: Mapping[str, Any], output_id: str) -> _Render:
    decoded = _linked(graph, graph[output_id], "images")
    sampler = _linked(graph, decoded, "samples")
    sampler_id = next((i for i, n in graph.items() if n is sampler), None)
    inputs = sampler.get("inputs") or {}
    latent = (_linked(graph, sampler, "latent_image").get("inputs")) or {}
    positive = (_linked(graph, sampler, "positive").get("inputs")) or {}

    def number(values: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
        value = values.get(name, default)
        return max(lo, min(hi, value)) if isinstance(value, int) else default

    return _Render(
        sampler_id=sampler_id,
        prompt=str(positive.get("text", "")),
        seed=number(inputs, "seed", 0, 0, 2**64 - 1),
        steps=number(inputs, "steps", 20, 1, 10_000),
        width=number(latent, "width", 512, MIN_SIDE, MAX_SIDE),
        height=number(latent, "height", 512, MIN_SIDE, MAX_SIDE),
    )


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: ComfyUIServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # One port, as ComfyUI's: a GET /ws goes to the WebSocket server, the rest to HTTP.
        if _asks_for_websocket(request):
            self.owner._ws_server.handler(request, client_address)
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


def _asks_for_websocket(sock: socket.socket) -> bool:
    """Peek at the request line (without consuming it) for GET /ws."""
    deadline = time.monotonic() + 2.0
    try:
        sock.settimeout(2.0)
        while time.monotonic() < deadline:
            head = sock.recv(64, socket.MSG_PEEK)
            if not head or b"\n" in head or len(head) >= 16:
                return bool(_WS_PATH.match(head))
            time.sleep(0.005)
    except OSError:
        return False
    finally:
        sock.settimeout(None)
    return False


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "gpuqueue-comfyui-standin/1.0"
    protocol_version = "HTTP/1.0"

    @property
    def owner(self) -> ComfyUIServer:
        return self.server.owner

    def log_message(self, format: str, *args: Any) -> None:
        if self.owner.verbose:
            super().log_message(format, *args)

    def _route(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        path = parts.path
        if path.startswith("/api/"):
            path = path[4:]
        return path, parse_qs(parts.query)

    def _refused(self, path: str) -> bool:
        if path in CONTROL_PATHS or is_authorized(self.owner.knobs, self.headers):
            return False
        self.owner._record_refused()
        discard_body(self.rfile, self.headers)
        self._send(401, b"401: Unauthorized", "text/plain")
        return True

    def do_GET(self) -> None:
        path, query = self._route()
        if self._refused(path):
            return
        owner = self.owner
        if path == "/system_stats":
            if not owner.knobs.healthy:
                self._send(503, b"503: Service Unavailable", "text/plain")
            else:
                self._json(200, owner.system_stats())
        elif path == "/prompt":
            self._json(200, {"exec_info": {"queue_remaining": owner.queue_remaining()}})
        elif path == "/queue":
            self._json(200, owner.queue_view())
        elif path == "/history":
            self._json(200, owner.history())
        elif path.startswith("/history/"):
            self._json(200, owner.history(path.removeprefix("/history/")))
        elif path == "/view":
            self._view(query)
        elif path == "/stats":
            self._json(200, owner.stats())
        elif path == "/knobs":
            self._json(200, public_knobs(owner.knobs))
        else:
            self._send(404, b"404: Not Found", "text/plain")

    def do_POST(self) -> None:
        path, _ = self._route()
        if self._refused(path):
            return
        owner = self.owner
        body = self._body()
        if path == "/prompt":
            status, answer = owner.queue_prompt(body)
            self._json(status, answer)
        elif path == "/queue":
            owner.edit_queue(body or {})
            self._send(200, b"", "application/octet-stream")
        elif path == "/interrupt":
            owner.interrupt(body or {})
            self._send(200, b"", "application/octet-stream")
        elif path == "/history":
            owner.edit_history(body or {})
            self._send(200, b"", "application/octet-stream")
        elif path == "/knobs":
            try:
                self._json(200, public_knobs(owner.set_knobs(body or {})))
            except ValueError as exc:
                self._json(400, {"error": str(exc)})
        elif path == "/reset-stats":
            owner.reset_stats()
            self._json(200, owner.stats())
        elif path == "/shutdown":
            self._json(200, {"status": "stopping"})
            threading.Thread(target=owner.stop, daemon=True).start()
        else:
            self._send(404, b"404: Not Found", "text/plain")

    def _view(self, query: Mapping[str, list[str]]) -> None:
        filename = (query.get("filename") or [""])[0]
        kind = (query.get("type") or ["output"])[0]
        subfolder = (query.get("subfolder") or [""])[0]
        if not filename:
            self._send(404, b"", "application/octet-stream")
            return
        if filename.startswith("/") or ".." in filename or kind not in ("output", "input", "temp"):
            self._send(400, b"", "application/octet-stream")
            return
        if ".." in subfolder or subfolder.startswith("/"):
            self._send(403, b"", "application/octet-stream")
            return
        data = self.owner.file(kind, subfolder, filename)
        if data is None:
            self._send(404, b"", "application/octet-stream")
            return
        self._send(200, data, "image/png", disposition=filename)

    def _body(self) -> dict[str, Any] | None:
        """The JSON object sent, or None (ComfyUI treats a bad body as empty)."""
        try:
            length = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY_BYTES)
        except ValueError:
            return None
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return body if isinstance(body, dict) else None

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str, disposition: str = "") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if disposition:
                self.send_header("Content-Disposition", f'filename="{disposition}"')
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError):
            pass


class ComfyUIServer(BackgroundServer[ComfyUIKnobs]):
    """In-process stand-in ComfyUI; binds in ``__init__`` so ``port`` is known early."""

    name = "comfyui-server"

    def __init__(
        self,
        port: int = 0,
        knobs: ComfyUIKnobs | None = None,
        host: str = "127.0.0.1",
        *,
        checkpoints: Sequence[str] = (DEFAULT_CHECKPOINT,),
        verbose: bool = False,
    ) -> None:
        self.knobs = knobs if knobs is not None else ComfyUIKnobs()
        self.verbose = verbose
        self.checkpoints = tuple(checkpoints)
        self._host = host
        self._init_serving()
        self._work = threading.Condition(self._lock)
        self._queue: list[_Queued] = []
        self._running: _Queued | None = None
        self._interrupt_flag = False
        self._counter = itertools.count()
        self._history: dict[str, dict[str, Any]] = {}
        self._files: dict[tuple[str, str, str], bytes] = {}
        self._image_counter = itertools.count(1)
        self._sockets: dict[str, ServerConnection] = {}
        self._reset_counts()
        self._ws_server: Server = serve(
            self._ws_session,
            sock=socket.socket(),  # never listens: connections come from the HTTP port
            process_request=self._ws_check,
            compression=None,
        )
        self._httpd = _HTTPServer((host, port), self)
        self._executor = threading.Thread(target=self._execute_forever, daemon=True)

    def _reset_counts(self) -> None:
        self._calls = 0
        self._prompts: list[str] = []
        self._interrupted = 0
        self._deleted = 0
        self._completed = 0
        self._failed = 0
        self._max_in_flight = 1 if self._running else 0
        self._refused = 0

    def _before_start(self) -> None:
        self._executor.start()

    def stop(self) -> None:
        with self._lock:
            self._work.notify_all()
            sockets = list(self._sockets.values())
        for connection in sockets:
            connection.close()
        super().stop()
        self._ws_server.socket.close()

    # --- what tests read -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._calls,
                "prompts": list(self._prompts),
                "in_flight": 1 if self._running else 0,
                "max_in_flight": self._max_in_flight,
                "queued": len(self._queue),
                "running": self._running.prompt_id if self._running else None,
                "interrupted": self._interrupted,
                "deleted": self._deleted,
                "completed": self._completed,
                "failed": self._failed,
                "refused": self._refused,
                "ws_clients": len(self._sockets),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counts()

    def system_stats(self) -> dict[str, Any]:
        return {
            "system": {
                "os": "posix",
                "ram_total": 67385786368,
                "ram_free": 60000000000,
                "comfyui_version": COMFYUI_VERSION,
                "python_version": sys.version,
                "pytorch_version": "2.5.1+cu124",
                "embedded_python": False,
                "argv": ["main.py", "--listen"],
            },
            "devices": [
                {
                    "name": "cuda:0 NVIDIA L4 : cudaMallocAsync",
                    "type": "cuda",
                    "index": 0,
                    "vram_total": 23580639232,
                    "vram_free": 21000000000,
                    "torch_vram_total": 0,
                    "torch_vram_free": 0,
                }
            ],
        }

    def queue_remaining(self) -> int:
        with self._lock:
            return len(self._queue) + (1 if self._running else 0)

    def queue_view(self) -> dict[str, Any]:
        with self._lock:
            running = [self._running.as_item()] if self._running else []
            return {"queue_running": running, "queue_pending": [q.as_item() for q in self._queue]}

    def history(self, prompt_id: str | None = None) -> dict[str, Any]:
        with self._lock:
            if prompt_id is None:
                return dict(self._history)
            entry = self._history.get(prompt_id)
            return {prompt_id: entry} if entry is not None else {}

    def file(self, kind: str, subfolder: str, filename: str) -> bytes | None:
        with self._lock:
            return self._files.get((kind, subfolder, filename))

    # --- routes ----------------------------------------------------------------------------

    def queue_prompt(self, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        body = body or {}
        graph = body.get("prompt")
        refusal = _validation_error(graph, self.checkpoints)
        with self._lock:
            self._calls += 1
            if refusal is not None:
                return 400, refusal
            capacity = self.knobs.capacity
            if capacity and len(self._queue) + (1 if self._running else 0) >= capacity:
                return 429, {"error": "queue full"}
            graph = cast(dict[str, Any], graph)
            prompt_id = str(body.get("prompt_id") or uuid.uuid4())
            number = float(body["number"]) if "number" in body else next(self._counter)
            if body.get("front"):
                number = -number
            extra = dict(body.get("extra_data") or {})
            if "client_id" in body:
                extra["client_id"] = body["client_id"]
            outputs = [i for i, n in graph.items() if n["class_type"] in _OUTPUT_NODES]
            item = _Queued(number, prompt_id, graph, extra, outputs)
            heapq.heappush(self._queue, item)
            self._prompts.append(_render_of(graph, outputs[0]).prompt)
            self._work.notify_all()
        self._broadcast_status()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    def edit_queue(self, body: Mapping[str, Any]) -> None:
        with self._lock:
            if body.get("clear"):
                self._deleted += len(self._queue)
                self._queue.clear()
            wanted = body.get("delete")
            if isinstance(wanted, list):
                kept = [q for q in self._queue if q.prompt_id not in wanted]
                self._deleted += len(self._queue) - len(kept)
                self._queue = kept
                heapq.heapify(self._queue)
        self._broadcast_status()

    def interrupt(self, body: Mapping[str, Any]) -> None:
        with self._lock:
            wanted = body.get("prompt_id")
            if wanted is not None and (self._running is None or self._running.prompt_id != wanted):
                return  # newer servers: "Prompt ... is not currently running, skipping"
            self._interrupt_flag = True

    def edit_history(self, body: Mapping[str, Any]) -> None:
        with self._lock:
            if body.get("clear"):
                self._history.clear()
            for prompt_id in body.get("delete") or []:
                self._history.pop(str(prompt_id), None)

    # --- the WebSocket ---------------------------------------------------------------------

    def _ws_check(self, connection: ServerConnection, request: Request) -> Response | None:
        if is_authorized(self.knobs, cast(Any, request.headers)):
            return None
        self._record_refused()
        return connection.respond(401, "401: Unauthorized")

    def _ws_session(self, connection: ServerConnection) -> None:
        query = parse_qs(urlsplit(connection.request.path if connection.request else "").query)
        client_id = (query.get("clientId") or [uuid.uuid4().hex])[0]
        with self._lock:
            replaced = self._sockets.get(client_id)
            self._sockets[client_id] = connection
            remaining = len(self._queue) + (1 if self._running else 0)
        if replaced is not None:
            replaced.close()
        status = {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id}
        self._send_to(connection, "status", status)
        try:
            for _ in connection:  # ComfyUI reads and ignores what clients send
                pass
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                if self._sockets.get(client_id) is connection:
                    del self._sockets[client_id]

    def _send_to(self, connection: ServerConnection, kind: str, data: Mapping[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):  # the client left meanwhile
            connection.send(json.dumps({"type": kind, "data": data}))

    def _send_event(self, kind: str, data: Mapping[str, Any], client_id: str | None) -> None:
        """To the prompt's client; to everyone when `client_id` is None (ComfyUI's sid=None)."""
        with self._lock:
            if client_id is None:
                targets = list(self._sockets.values())
            else:
                one = self._sockets.get(client_id)
                targets = [one] if one is not None else []
        for connection in targets:
            self._send_to(connection, kind, data)

    def _broadcast_status(self) -> None:
        remaining = self.queue_remaining()
        self._send_event("status", {"status": {"exec_info": {"queue_remaining": remaining}}}, None)

    # --- the executor ----------------------------------------------------------------------

    def _execute_forever(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopped:
                    self._work.wait(0.5)
                if self._stopped:
                    return
                item = heapq.heappop(self._queue)
                self._running = item
                self._interrupt_flag = False  # reset at the start of every prompt
                self._max_in_flight = 1
                fail = self._draw_failure()
            self._execute(item, fail=fail)
            with self._lock:
                self._running = None
            self._broadcast_status()

    def _draw_failure(self) -> bool:
        knobs = self.knobs
        if knobs.failure_seed != self._rng_seed:
            self._rng_seed = knobs.failure_seed
            self._rng = random.Random(self._rng_seed)
        return self._rng.random() < knobs.failure_rate

    def _execute(self, item: _Queued, *, fail: bool) -> None:
        prompt_id, client_id = item.prompt_id, item.extra_data.get("client_id")
        messages: list[list[Any]] = []

        def event(kind: str, data: dict[str, Any], *, everyone: bool = False) -> None:
            data = {**data, "prompt_id": prompt_id}
            if kind.startswith("execution_"):
                data["timestamp"] = _now_ms()
                messages.append([kind, data])
            if everyone or client_id is not None:
                self._send_event(kind, data, None if everyone else client_id)

        event("execution_start", {})
        event("execution_cached", {"nodes": []})
        executed: list[str] = []
        outputs: dict[str, Any] = {}
        current = ("", "")
        try:
            for node_id, node in item.graph.items():
                current = (node_id, node["class_type"])
                self._check_interrupt()
                event("executing", {"node": node_id, "display_node": node_id})
                if node["class_type"] == "KSampler":
                    self._sample(item, node_id, fail=fail, event=event)
                elif node["class_type"] in _OUTPUT_NODES:
                    images = self._save(item, node_id)
                    outputs[node_id] = {"images": images}
                    event(
                        "executed",
                        {"node": node_id, "display_node": node_id, "output": outputs[node_id]},
                    )
                executed.append(node_id)
        except _Interrupted:
            event(
                "execution_interrupted",
                {"node_id": current[0], "node_type": current[1], "executed": executed},
                everyone=True,
            )
            self._finish(item, outputs, messages, success=False, count="interrupted")
            return
        except _NodeFailed as failure:
            event(
                "execution_error",
                {
                    "node_id": failure.node_id,
                    "node_type": failure.node_type,
                    "executed": executed,
                    "exception_message": failure.message,
                    "exception_type": "torch.OutOfMemoryError",
                    "traceback": ['  File "execution.py", line 1, in execute\n'],
                    "current_inputs": {},
                    "current_outputs": {},
                },
            )
            self._finish(item, outputs, messages, success=False, count="failed")
            return
        event("execution_success", {})
        self._finish(item, outputs, messages, success=True, count="completed")
        if client_id is not None:
            self._send_event("executing", {"node": None, "prompt_id": prompt_id}, client_id)

    def _check_interrupt(self) -> None:
        with self._lock:
            if self._interrupt_flag or self._stopped:
                self._interrupt_flag = False
                raise _Interrupted

    def _sample(self, item: _Queued, node_id: str, *, fail: bool, event: Any) -> None:
        inputs = item.graph[node_id].get("inputs") or {}
        steps = inputs["steps"] if isinstance(inputs.get("steps"), int) else 20
        steps = max(1, min(steps, 10_000))
        if fail:
            raise _NodeFailed(
                node_id,
                "KSampler",
                "Allocation on device would exceed allowed memory. (out of memory)\n"
                "This error means you ran out of memory on your GPU.",
            )
        for step in range(1, steps + 1):
            if self._stop_event.wait(self.knobs.latency_s / steps):
                raise _Interrupted
            self._hold_while_hanging()
            self._check_interrupt()
            event("progress", {"value": step, "max": steps, "node": node_id})

    def _hold_while_hanging(self) -> None:
        deadline = time.monotonic() + HANG_BOUND_S
        while self.knobs.hang and time.monotonic() < deadline:
            with self._lock:
                if self._interrupt_flag:
                    return
            if self._stop_event.wait(_HANG_TICK_S):
                return

    def _save(self, item: _Queued, node_id: str) -> list[dict[str, str]]:
        render = _render_of(item.graph, node_id)
        png = render_png(render.prompt, render.seed, render.width, render.height)
        kind = "output" if item.graph[node_id]["class_type"] == "SaveImage" else "temp"
        prefix = str((item.graph[node_id].get("inputs") or {}).get("filename_prefix", "ComfyUI"))
        filename = f"{prefix}_{next(self._image_counter):05d}_.png"
        with self._lock:
            self._files[(kind, "", filename)] = png
        return [{"filename": filename, "subfolder": "", "type": kind}]

    def _finish(
        self,
        item: _Queued,
        outputs: dict[str, Any],
        messages: list[list[Any]],
        *,
        success: bool,
        count: str,
    ) -> None:
        status = {
            "status_str": "success" if success else "error",
            "completed": success,
            "messages": messages,
        }
        with self._lock:
            self._history[item.prompt_id] = {
                "prompt": item.as_item(),
                "outputs": outputs,
                "status": status,
                "meta": {},
            }
            setattr(self, f"_{count}", getattr(self, f"_{count}") + 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stand-in ComfyUI server.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds of sampling a prompt")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--failure-seed", type=int, default=None)
    parser.add_argument("--capacity", type=int, default=0, help="0 = unlimited queue")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--unhealthy", action="store_true")
    parser.add_argument("--auth-token", default=None)
    parser.add_argument("--auth-header", default="Authorization")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    server = ComfyUIServer(port=args.port, verbose=args.verbose)
    try:
        server.set_knobs(
            {
                "latency_s": args.latency,
                "failure_rate": args.failure_rate,
                "failure_seed": args.failure_seed,
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
    print(f"comfyui-server listening on {server.url}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
