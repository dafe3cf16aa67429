"""ComfyUI: queue the endpoint's workflow, patched with the task, and follow it to its image.

The wire (docs/gpu-servers.md section 1): open `/ws?clientId=<id>` first, so the prompt's
events come to us; `POST /prompt {"prompt": graph, "client_id": id}`; follow `progress`
events of the steps node and the end (`execution_success`, `execution_error`,
`execution_interrupted`); read the output node's image reference from `/history/{id}` and
fetch it from `/view`. Without a socket (refused, or dropped midway) `/history/{id}` is
polled instead, with no step progress.

Cancel: a prompt still waiting in ComfyUI's queue is deleted from it (`POST /queue`); the
running one is interrupted (`POST /interrupt {"prompt_id"}`: newer servers interrupt only
that prompt, older ones whatever runs, which is ours once /queue said so). An interrupt we
did not ask for (someone at the server's UI) is a retryable failure, not a cancel.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlencode

import requests

from gpuqueue.errors import GpuCanceled, GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.call_watch import NO_WATCH, POLL_SECONDS, CallWatch
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.http_deadline import AnswerOverLimit, request_within
from gpuqueue.gpu.image_client import (
    CONNECT_TIMEOUT_SECONDS,
    IDENTITY,
    PNG_MAGIC,
    RETRYABLE_STATUSES,
    image_answer_limit,
)
from gpuqueue.gpu.memory_budget import MIB, AnswerTooLarge, MemoryHold
from gpuqueue.models import ComfyWorkflow, Endpoint, Task

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

# Small JSON calls (queue, interrupt, history) get at most this long each.
CONTROL_CALL_SECONDS = 10.0
# /history and /queue bodies carry whole graphs; more than this is not a server we know.
CONTROL_ANSWER_BYTES = 16 * MIB
# With a socket, /history is still read now and then: a server that stopped sending events
# (or never sends `execution_success`) is noticed.
HISTORY_CHECK_SECONDS = 10.0
# How long an ended prompt's history may lag its last event.
HISTORY_SETTLE_SECONDS = 5.0
# After asking ComfyUI to stop our prompt, how long to wait for it to say it stopped
# before the slot is handed back anyway.
CANCEL_CONFIRM_SECONDS = 5.0
# Preview frames (binary) can be a few hundred KB; events are small.
WS_MAX_MESSAGE_BYTES = 4 * MIB
WS_RECEIVE_TICK_SECONDS = 0.25

Kind = Literal["progress", "succeeded", "failed", "interrupted", "finished"]


@dataclass(frozen=True)
class Happening:
    """What one ws event means for our prompt."""

    kind: Kind
    step: int = 0
    steps: int = 0
    message: str = ""


def task_seed(task: Task) -> int:
    """The task's seed, or one derived from its id: random across tasks, the same on a
    retry (ComfyUI then serves cached outputs, and the image is the one a retry expects).
    ComfyUI wants seed >= 0."""
    if task.params.seed is not None:
        return task.params.seed
    return int.from_bytes(hashlib.sha256(task.task_id.encode()).digest()[:6], "big")


def patched_graph(workflow: ComfyWorkflow, task: Task) -> dict[str, dict[str, Any]]:
    """A copy of the workflow's graph with the task's prompt, negative prompt, seed, size
    and steps set at the workflow's nodes."""
    graph = copy.deepcopy(workflow.graph)

    def inputs(node_id: str) -> dict[str, Any]:
        node_inputs: dict[str, Any] = graph[node_id]["inputs"]
        return node_inputs

    params = task.params
    inputs(workflow.prompt_node)["text"] = task.prompt
    if workflow.negative_node is not None:
        inputs(workflow.negative_node)["text"] = task.negative_prompt or ""
    if workflow.seed_node is not None:
        inputs(workflow.seed_node)[workflow.seed_input] = task_seed(task)
    if workflow.size_node is not None:
        size = inputs(workflow.size_node)
        size["width"], size["height"] = params.width, params.height
        if "batch_size" in size:
            size["batch_size"] = 1
    if workflow.steps_node is not None:
        inputs(workflow.steps_node)["steps"] = params.steps
    return graph


def read_event(message: str | bytes, prompt_id: str, steps_node: str | None) -> Happening | None:
    """A ws message -> what it means for our prompt; None: not ours or nothing to act on
    (binary previews, `status`, `executing` a node, other prompts' events)."""
    if isinstance(message, bytes):
        return None
    try:
        event = json.loads(message)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        return None
    kind, data = event.get("type"), event["data"]
    if data.get("prompt_id") != prompt_id:
        return None
    if kind == "progress":
        return _progress(data, steps_node)
    if kind == "executing":
        # `node: null` is older servers' end of a prompt; a node id, one more node started.
        return Happening("finished") if data.get("node") is None else None
    if kind == "execution_error":
        return Happening("failed", message=_execution_error_text(data))
    ending = ENDINGS.get(str(kind))
    return None if ending is None else Happening(ending)


ENDINGS: dict[str, Kind] = {
    "execution_success": "succeeded",
    "execution_interrupted": "interrupted",
}


def _progress(data: Mapping[str, Any], steps_node: str | None) -> Happening | None:
    # Other nodes (an upscaler, a tiled VAE) count their own steps: only the steps node's
    # are the task's.
    if steps_node is not None and str(data.get("node")) != steps_node:
        return None
    value, most = data.get("value"), data.get("max")
    if not isinstance(value, int) or not isinstance(most, int) or most <= 0:
        return None
    return Happening("progress", step=min(value, most), steps=most)


def _execution_error_text(data: Mapping[str, Any]) -> str:
    node = data.get("node_id")
    node_type = data.get("node_type")
    where = f" in node {node} ({node_type})" if node is not None else ""
    exception = data.get("exception_type") or "error"
    message = " ".join(str(data.get("exception_message", "")).split())  # one log line
    return f"{exception}{where}: {message[:500]}"


def history_outcome(entry: Mapping[str, Any]) -> Happening | None:
    """A /history/{id} entry -> succeeded, failed (ComfyUI's message) or interrupted; None
    while it has no final status. Interrupted and failed both read `status_str: "error"`:
    the messages tell them apart."""
    status = entry.get("status")
    if not isinstance(status, dict):
        # Very old servers write no status: outputs mean it ran.
        return Happening("succeeded") if entry.get("outputs") else None
    if status.get("status_str") == "success" or status.get("completed") is True:
        return Happening("succeeded")
    if status.get("status_str") != "error":
        return None
    for message in status.get("messages") or []:
        if isinstance(message, list) and len(message) == 2:
            if message[0] == "execution_interrupted":
                return Happening("interrupted")
            if message[0] == "execution_error" and isinstance(message[1], dict):
                return Happening("failed", message=_execution_error_text(message[1]))
    return Happening("failed", message="ComfyUI reported an error without its message")


def prompt_refusal(body: Any) -> str:
    """The reason in a 400 from POST /prompt: `error` a string (old servers) or an object,
    `node_errors` a list (old) or a dict of node id -> {errors, class_type}."""
    if not isinstance(body, dict):
        return "ComfyUI refused the workflow"
    error = body.get("error")
    if isinstance(error, dict):
        reason = str(error.get("message") or error.get("type") or "refused")
        details = str(error.get("details") or "").strip()
        if details:
            reason += f": {details}"
    else:
        reason = str(error or "refused")
    nodes = body.get("node_errors")
    if isinstance(nodes, dict) and nodes:
        parts = []
        for node_id, node in list(nodes.items())[:5]:
            errors = node.get("errors", []) if isinstance(node, dict) else []
            first = errors[0] if errors and isinstance(errors[0], dict) else {}
            class_type = node.get("class_type", "?") if isinstance(node, dict) else "?"
            parts.append(
                f"node {node_id} ({class_type}): {first.get('message', 'invalid')} "
                f"{first.get('details', '')}".strip()
            )
        reason += " [" + "; ".join(parts) + "]"
    return reason[:1000]


Place = Literal["pending", "running", "gone", "unknown"]


def queue_place(queue: Any, prompt_id: str) -> Place:
    """Where GET /queue shows the prompt: items are [number, prompt_id, graph, extra, outputs]."""
    if not isinstance(queue, dict):
        return "unknown"
    for place, key in (("running", "queue_running"), ("pending", "queue_pending")):
        items = queue.get(key) or []
        if any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in items):
            return "running" if place == "running" else "pending"
    return "gone"


class ComfyUIImageClient:
    """`protocol: comfyui`: the endpoint's workflow, queued, followed and fetched."""

    def __init__(
        self,
        session: requests.Session | None = None,
        credentials: GpuCredentials | None = None,
        *,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._session = session or requests.Session()
        self._credentials = credentials or GpuCredentials()
        self._poll = poll_seconds

    def generate(
        self,
        endpoint: Endpoint,
        task: Task,
        *,
        timeout_seconds: float,
        hold: MemoryHold | None = None,
        watch: CallWatch = NO_WATCH,
    ) -> bytes:
        workflow = endpoint.workflow
        if workflow is None:
            raise PermanentGpuError(f"endpoint {endpoint.endpoint_id} has no comfyui workflow")
        call = _Call(
            self,
            endpoint,
            workflow=workflow,
            task=task,
            deadline=time.monotonic() + timeout_seconds,
            watch=watch,
        )
        try:
            call.open_events()
            call.queue_prompt(patched_graph(workflow, task))
            watch.job_started(call.prompt_id)
            reference = call.follow()
        finally:
            call.close_events()
        return call.fetch_image(reference, hold)


class _Call:
    """One prompt's life on one server."""

    def __init__(
        self,
        client: ComfyUIImageClient,
        endpoint: Endpoint,
        *,
        workflow: ComfyWorkflow,
        task: Task,
        deadline: float,
        watch: CallWatch,
    ) -> None:
        self._client = client
        self.endpoint = endpoint
        self.workflow = workflow
        self.task = task
        self.deadline = deadline
        self.watch = watch
        self.client_id = uuid.uuid4().hex
        self.prompt_id = ""
        self.events: ClientConnection | None = None
        # websockets 17 wants its connection entered as a context manager.
        self._exits = contextlib.ExitStack()
        self._base = endpoint.url.rstrip("/")

    # --- events --------------------------------------------------------------------------

    def open_events(self) -> None:
        """Connect the ws before queueing (ComfyUI routes a prompt's events by client id);
        without one, the call goes by /history alone."""
        from websockets.sync.client import connect  # noqa: PLC0415 - only comfyui calls need it

        scheme, rest = self._base.split("://", 1)
        url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={self.client_id}"
        try:
            headers = self._client._credentials.headers(self.endpoint)
            self.events = self._exits.enter_context(
                connect(
                    url,
                    additional_headers=headers,
                    open_timeout=min(CONNECT_TIMEOUT_SECONDS, self._left()),
                    max_size=WS_MAX_MESSAGE_BYTES,
                    compression=None,
                    proxy=None,
                )
            )
        except Exception:  # any failure to connect: follow by /history instead
            self.events = None

    def close_events(self) -> None:
        self.events = None
        with contextlib.suppress(Exception):  # a socket we are done with
            self._exits.close()

    def _next_event(self, seconds: float) -> Happening | None:
        """Wait up to `seconds` for our next event; drops to polling if the socket goes."""
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        assert self.events is not None
        try:
            message = self.events.recv(timeout=max(0.0, seconds))
        except TimeoutError:
            return None
        except ConnectionClosed:
            self.events = None
            return None
        return read_event(message, self.prompt_id, self.workflow.steps_node)

    # --- the prompt ----------------------------------------------------------------------

    def queue_prompt(self, graph: dict[str, dict[str, Any]]) -> None:
        # A prompt_id of ours: newer servers take it, older ones answer their own (used).
        wanted = str(uuid.uuid4())
        body = {"prompt": graph, "client_id": self.client_id, "prompt_id": wanted}
        response = self._request("POST", "/prompt", json=body)
        answer = _json_of(response)
        if response.status_code == 400:
            raise PermanentGpuError(
                f"endpoint {self.endpoint.endpoint_id} refused the workflow: "
                f"{prompt_refusal(answer)}"
            )
        self._raise_for_status(response)
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not isinstance(prompt_id, str) or not prompt_id:
            raise RetryableGpuError(
                f"endpoint {self.endpoint.endpoint_id} queued no prompt (no prompt_id)"
            )
        self.prompt_id = prompt_id
        node_errors = answer.get("node_errors")
        if isinstance(node_errors, dict) and self.workflow.output_node in node_errors:
            # Valid outputs run, invalid ones are skipped: ours would never come.
            raise PermanentGpuError(
                f"endpoint {self.endpoint.endpoint_id} refused the workflow: "
                f"{prompt_refusal({'error': 'output node failed validation', **answer})}"
            )

    def follow(self) -> dict[str, Any]:
        """Until the prompt ends: its output image's reference (filename, subfolder, type)."""
        next_history = time.monotonic() + (HISTORY_CHECK_SECONDS if self.events else 0.0)
        while True:
            if self._left() <= 0:
                self._stop()
                raise GpuTimeout(
                    f"endpoint {self.endpoint.endpoint_id} timed out on prompt {self.prompt_id}"
                )
            waiting = 0.0 if self.events is not None else min(self._client._poll, self._left())
            if self.watch.wait_cancel(waiting):
                self._stop()
                raise GpuCanceled(f"prompt {self.prompt_id} canceled by its owner")
            listening = self.events is not None
            happening = (
                self._next_event(min(WS_RECEIVE_TICK_SECONDS, self._left())) if listening else None
            )
            if listening and self.events is None:
                # The socket dropped: poll /history from now on, not at the next
                # with-a-socket check (up to HISTORY_CHECK_SECONDS away).
                next_history = time.monotonic()
            if happening is None and time.monotonic() >= next_history:
                next_history = time.monotonic() + (
                    HISTORY_CHECK_SECONDS if self.events else self._client._poll
                )
                entry = self._history()
                happening = history_outcome(entry) if entry else None
            if happening is None:
                continue
            if happening.kind == "progress":
                self.watch.progress(happening.step, happening.steps)
                continue
            return self._ended(happening)

    def _ended(self, happening: Happening) -> dict[str, Any]:
        if happening.kind == "failed":
            raise PermanentGpuError(
                f"endpoint {self.endpoint.endpoint_id} failed prompt {self.prompt_id}: "
                f"{happening.message}"
            )
        if happening.kind == "interrupted":
            # Not ours (ours raise GpuCanceled before reading on): someone stopped the
            # server's work; the task itself is fine to run again.
            raise RetryableGpuError(
                f"endpoint {self.endpoint.endpoint_id} interrupted prompt {self.prompt_id} "
                "(not a cancel of ours)"
            )
        entry = self._settled_history()
        if not entry:
            raise RetryableGpuError(
                f"endpoint {self.endpoint.endpoint_id} has no history for prompt {self.prompt_id}"
            )
        outcome = history_outcome(entry)
        if outcome is not None and outcome.kind != "succeeded":
            return self._ended(outcome)
        return self._image_reference(entry)

    def _image_reference(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        outputs = entry.get("outputs")
        node = outputs.get(self.workflow.output_node) if isinstance(outputs, dict) else None
        images = node.get("images") if isinstance(node, dict) else None
        if not images or not isinstance(images[0], dict) or "filename" not in images[0]:
            raise PermanentGpuError(
                f"endpoint {self.endpoint.endpoint_id}: prompt {self.prompt_id} left no image "
                f"at output node {self.workflow.output_node} (is it a SaveImage?)"
            )
        reference: dict[str, Any] = images[0]
        return reference

    def _settled_history(self) -> dict[str, Any] | None:
        """The history entry of a prompt that just ended. ComfyUI sends `execution_success`
        from its executor and writes the history after (main.py's prompt_worker): a read
        right on the event may find nothing yet."""
        until = time.monotonic() + HISTORY_SETTLE_SECONDS
        while True:
            entry = self._history()
            if entry is not None or time.monotonic() >= until:
                return entry
            time.sleep(0.05)

    def _history(self) -> dict[str, Any] | None:
        response = self._request("GET", f"/history/{self.prompt_id}")
        self._raise_for_status(response)
        answer = _json_of(response)
        entry = answer.get(self.prompt_id) if isinstance(answer, dict) else None
        return entry if isinstance(entry, dict) and entry else None

    def fetch_image(self, reference: Mapping[str, Any], hold: MemoryHold | None) -> bytes:
        query = urlencode(
            {
                "filename": str(reference.get("filename", "")),
                "subfolder": str(reference.get("subfolder", "")),
                "type": str(reference.get("type", "output")),
            }
        )
        # The PNG itself, not base64: its in-memory size is its size.
        limit = image_answer_limit(self.task.params)
        reserve = hold.reserver(limit=limit, factor=1.0) if hold is not None else None
        response = self._request(
            "GET", f"/view?{query}", max_bytes=limit, on_answer=reserve, whole_call=True
        )
        self._raise_for_status(response)
        png = response.content
        if hold is not None:
            hold.keep_only(len(png))
        if not png.startswith(PNG_MAGIC):
            raise PermanentGpuError(
                f"endpoint {self.endpoint.endpoint_id} returned data that is not a PNG"
            )
        return png

    # --- stopping ------------------------------------------------------------------------

    def _stop(self) -> None:
        """Free the GPU of our prompt, best effort: delete it while it waits, interrupt it
        while it runs, then wait (briefly) for the server to say it stopped."""
        try:
            place = self._place()
            if place == "pending":
                self._request("POST", "/queue", json={"delete": [self.prompt_id]})
                # It may have started between the two calls: deleting misses a running one.
                place = self._place()
            if place in ("running", "unknown"):
                self._request("POST", "/interrupt", json={"prompt_id": self.prompt_id})
                self._await_stopped(time.monotonic() + CANCEL_CONFIRM_SECONDS)
        except (RetryableGpuError, PermanentGpuError):
            # Unreachable or odd: nothing more to do from here; it ends or the server dies.
            return

    def _place(self) -> Place:
        try:
            response = self._request("GET", "/queue")
        except RetryableGpuError:
            return "unknown"
        if response.status_code != 200:
            return "unknown"
        return queue_place(_json_of(response), self.prompt_id)

    def _await_stopped(self, until: float) -> None:
        while time.monotonic() < until:
            if self.events is not None:
                happening = self._next_event(min(WS_RECEIVE_TICK_SECONDS, until - time.monotonic()))
                if happening is not None and happening.kind != "progress":
                    return
            else:
                if self._history() is not None:
                    return
                time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    # --- HTTP ----------------------------------------------------------------------------

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def _request(
        self,
        method: Literal["GET", "POST"],
        path: str,
        *,
        json: dict[str, Any] | None = None,
        max_bytes: int = CONTROL_ANSWER_BYTES,
        on_answer: Any = None,
        whole_call: bool = False,
    ) -> requests.Response:
        endpoint = self.endpoint
        route = path.split("?", maxsplit=1)[0]
        # Control calls after the deadline still get a little time: stopping a prompt
        # that timed out is worth a second.
        seconds = max(self._left(), 1.0)
        if not whole_call:
            seconds = min(seconds, CONTROL_CALL_SECONDS)
        extra: dict[str, Any] = {} if json is None else {"json": json}
        try:
            return self._client._credentials.send(
                endpoint,
                lambda headers: request_within(
                    self._client._session,
                    method,
                    f"{self._base}{path}",
                    seconds=seconds,
                    connect_seconds=CONNECT_TIMEOUT_SECONDS,
                    max_bytes=max_bytes,
                    on_answer=on_answer,
                    headers=dict(headers) | IDENTITY,
                    **extra,
                ),
            )
        except AnswerTooLarge as error:
            raise PermanentGpuError(f"endpoint {endpoint.endpoint_id}: {error}") from error
        except AnswerOverLimit as error:
            raise RetryableGpuError(f"endpoint {endpoint.endpoint_id} sent {error}") from error
        except requests.ConnectTimeout as error:
            raise RetryableGpuError(
                f"endpoint {endpoint.endpoint_id} unreachable: {type(error).__name__}"
            ) from error
        except requests.Timeout as error:
            if self._left() <= 0:
                raise GpuTimeout(
                    f"endpoint {endpoint.endpoint_id} timed out on {method} {route}"
                ) from error
            raise RetryableGpuError(
                f"endpoint {endpoint.endpoint_id} did not answer {method} {route}"
            ) from error
        except requests.RequestException as error:
            raise RetryableGpuError(
                f"endpoint {endpoint.endpoint_id} unreachable: {type(error).__name__}"
            ) from error

    def _raise_for_status(self, response: requests.Response) -> None:
        status = response.status_code
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise RetryableGpuError(f"endpoint {self.endpoint.endpoint_id} answered HTTP {status}")
        if status >= 400:
            raise PermanentGpuError(
                f"endpoint {self.endpoint.endpoint_id} rejected the request: HTTP {status} "
                f"{response.text[:200]}"
            )


def _json_of(response: requests.Response) -> Any:
    try:
        return json.loads(response.content) if response.content else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
