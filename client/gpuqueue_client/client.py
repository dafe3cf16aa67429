"""A thin, typed wrapper over the gpuqueue HTTP API (see the README's "The API")."""

from __future__ import annotations

import html
import io
import logging
import mimetypes
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urljoin

import requests
from urllib3.filepost import encode_multipart_formdata
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from .push import PUSH_URL_HEADER, push_connect_url, pushed_task

TERMINAL_STATUSES = frozenset({"DONE", "FAILED", "CANCELED", "EXPIRED"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_MESSAGE = 500

# The API's cap on a synchronous speech request body, multipart framing included.
# A copy of SYNC_AUDIO_MAX_BYTES in layers/common/gpuqueue/speech/audio.py (whose docstring derives
# it from API Gateway's and Lambda's payload limits): the client never imports the server's
# layer, so keep the two in step. Bigger audio goes the async way (presigned S3 PUT).
SYNC_AUDIO_MAX_BYTES = 4_000_000

# Content types by extension for the formats the speech routes accept; anything else falls
# back to `mimetypes`, then to application/octet-stream (and the API answers 415).
AUDIO_CONTENT_TYPES: Mapping[str, str] = {
    ".wav": "audio/wav",
    ".wave": "audio/wav",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".webm": "audio/webm",
    ".weba": "audio/webm",
    ".m4a": "audio/mp4",
    ".mp4": "audio/mp4",
}
PCM_SAMPLE_WIDTH = 2  # the PCM route takes 16-bit little-endian samples
_UPLOAD_CHUNK = 1 << 20
# Waiting on a push socket: how long its opening and closing handshakes may take.
PUSH_OPEN_TIMEOUT = 10.0
PUSH_CLOSE_TIMEOUT = 2.0

_log = logging.getLogger(__name__)


class Readable(Protocol):
    """What an upload reads from: an open binary file, or anything with `read(n)`."""

    def read(self, size: int = -1, /) -> bytes: ...


# Audio to send: a path, the bytes themselves, or an open binary file (read from where it is).
AudioSource = str | os.PathLike[str] | bytes | Readable
# progress(bytes sent so far, total bytes)
ProgressCallback = Callable[[int, int], None]


class ApiError(Exception):
    """A non-2xx answer from the API (or from the presigned-URL host)."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(f"{status} {code or 'ERROR'}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: requests.Response) -> ApiError:
        code: str | None = None
        field: str | None = None
        message = ""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            # Ours: {"error", "code", "field"?}; API Gateway's own: {"message": "Unauthorized"}.
            raw = body.get("error") or body.get("message")
            message = str(raw) if raw is not None else ""
            code = _str_or_none(body.get("code"))
            field = _str_or_none(body.get("field"))
        if not message:
            text = response.text.strip()
            s3_error = _s3_error(text)
            if s3_error is not None:  # a presigned URL's host: <Error><Code>..<Message>..
                code, message = s3_error
            else:
                message = text[:_MAX_MESSAGE] if text else (response.reason or "request failed")
        return cls(
            status=response.status_code,
            code=code,
            message=message,
            field=field,
            retry_after=_parse_retry_after(response.headers.get("Retry-After")),
        )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _s3_error(text: str) -> tuple[str, str] | None:
    """(Code, Message) of S3's XML error document, or None for anything else."""
    if "<Error>" not in text[:200]:
        return None
    code = re.search(r"<Code>(.*?)</Code>", text, re.DOTALL)
    if code is None:
        return None
    found = re.search(r"<Message>(.*?)</Message>", text, re.DOTALL)
    message = html.unescape(found[1].strip()) if found else ""
    code_text = html.unescape(code[1].strip())
    return code_text, (message or code_text)[:_MAX_MESSAGE]


def _parse_retry_after(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        seconds = int(value.strip())
    except ValueError:
        return None  # an HTTP-date: the API never sends one
    return max(seconds, 0)


class GpuqueueClient:
    """One API endpoint, optionally one user's bearer token.

    `register` and `login` store the token they get on the client (`token`, `expires_at`).
    `push_url` is the WebSocket URL the API last announced (`X-Push-Url`, on the submit
    answer and task status answers), None while it has announced none: `wait` uses it.
    """

    # The largest synchronous speech request this client sends (see SYNC_AUDIO_MAX_BYTES).
    sync_max_bytes: int = SYNC_AUDIO_MAX_BYTES
    # Waiting on push, the task's status is still read this often: a lost event costs this
    # much delay, never the whole timeout.
    push_check_interval: float = 30.0

    def __init__(
        self,
        api_url: str,
        token: str | None = None,
        *,
        session: requests.Session | None = None,
        timeout: float = 30,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.expires_at: float | None = None
        self.push_url: str | None = None
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout

    # -- auth -----------------------------------------------------------------------------

    def register(self, username: str, password: str, *, email: str | None = None) -> str | None:
        """Create the user and return its access token (201), or None where the stack verifies
        sign-ups by e-mail (202: a code is on its way; `confirm_registration` takes it)."""
        body = {"username": username, "password": password}
        if email is not None:
            body["email"] = email
        response = self._request("POST", "/register", json=body, auth=False)
        if response.status_code == 202:
            return None
        return self._take_token("/register", self._json(response))

    def confirm_registration(self, username: str, password: str, code: str) -> str:
        """Confirm an e-mailed sign-up code and return the new user's access token."""
        body = {"username": username, "password": password, "code": code}
        response = self._request("POST", "/register/confirm", json=body, auth=False)
        return self._take_token("/register/confirm", self._json(response))

    def login(self, username: str, password: str) -> str:
        """Return a fresh access token for an existing user."""
        body = {"username": username, "password": password}
        return self._take_token(
            "/login", self._json(self._request("POST", "/login", json=body, auth=False))
        )

    def _take_token(self, path: str, body: Any) -> str:
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError(502, "BAD_RESPONSE", f"no token in the answer to {path}")
        expires_in = body.get("expires_in")
        self.token = token
        self.expires_at = (
            time.time() + float(expires_in) if isinstance(expires_in, int | float) else None
        )
        return token

    # -- tasks ----------------------------------------------------------------------------

    def submit_image(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        priority: str | None = None,
    ) -> dict[str, Any]:
        """Queue an image task; returns `{"task_id", "status", "message"}`.

        The answer's `X-Push-Url`, when there is one, is kept in `push_url`.
        """
        payload: dict[str, Any] = {"prompt": prompt}
        optional = {
            "negative_prompt": negative_prompt,
            "width": width,
            "height": height,
            "steps": steps,
            "seed": seed,
            "priority": priority,
        }
        payload.update({key: value for key, value in optional.items() if value is not None})
        return self._object(self._request("POST", "/api/v1/image/async", json=payload))

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._object(self._request("GET", f"/api/v1/tasks/{_segment(task_id)}"))

    def list_tasks(
        self, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the caller's tasks, newest first, and the next page's cursor."""
        params: dict[str, str | int] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        response = self._request("GET", "/api/v1/tasks", params=params)
        body = self._json(response)
        if not isinstance(body, list):
            raise ApiError(response.status_code, "BAD_RESPONSE", "expected a JSON array of tasks")
        tasks = [item for item in body if isinstance(item, dict)]
        return tasks, response.headers.get("X-Next-Cursor") or None

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._object(self._request("DELETE", f"/api/v1/tasks/{_segment(task_id)}"))

    def stats(self) -> dict[str, Any]:
        return self._object(self._request("GET", "/api/v1/system/stats"))

    def download_image(self, task_id: str) -> bytes:
        """The PNG of a DONE task: follow the API's 302 to the presigned URL, without auth."""
        response = self._request("GET", f"/api/images/{_segment(task_id)}", allow_redirects=False)
        if response.status_code not in _REDIRECTS:
            if response.ok and response.status_code < 300:
                return response.content  # a 2xx straight from the API: the image itself
            raise ApiError.from_response(response)
        location = response.headers.get("Location")
        if not location:
            raise ApiError(response.status_code, "BAD_RESPONSE", "redirect without a Location")
        # The presigned URL carries its own signature: a bearer token there is refused
        # (and must not leak to another host), so drop any session-level Authorization.
        image = self.session.get(
            urljoin(response.url or self.api_url + "/", location),
            headers={"Authorization": None},
            timeout=self.timeout,
        )
        if not image.ok:
            raise ApiError.from_response(image)
        return image.content

    def wait(
        self,
        task_id: str,
        *,
        timeout: float = 300,
        poll_interval: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        push: bool = True,
    ) -> dict[str, Any]:
        """Wait until the task is DONE, FAILED, CANCELED or EXPIRED; TimeoutError after `timeout` s.

        With `push` and a `push_url` known (from the submit answer or the first status
        answer) the task's final event is awaited on the API's WebSocket; if that cannot
        connect, or drops, the task is polled every `poll_interval` s for the time left.
        `on_update` gets each task state read, and each pushed one (its progress while it
        runs, its end).
        """
        deadline = time.monotonic() + timeout
        interval = max(poll_interval, 0.0)
        push_tried = not push
        while True:
            if not push_tried and self.push_url:
                push_tried = True
                pushed = self._wait_by_push(self.push_url, task_id, deadline, on_update)
                if pushed is not None:
                    return pushed
            task = self.get_task(task_id)
            if on_update is not None:
                on_update(task)
            if task.get("status") in TERMINAL_STATUSES:
                return task
            if not push_tried and self.push_url:
                continue  # this answer announced push: connect now, not after a poll interval
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"task {task_id} is still {task.get('status')} after {timeout:g} s"
                )
            time.sleep(min(interval, remaining))

    def _wait_by_push(
        self,
        push_url: str,
        task_id: str,
        deadline: float,
        on_update: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any] | None:
        """The final task, from the push socket; None to poll instead (no socket, it
        dropped, or the deadline came: the poll loop's last read decides then)."""
        url = push_connect_url(push_url, self.token or "", api_url=self.api_url)
        remaining = deadline - time.monotonic()
        if url is None or not self.token or remaining <= 0:
            return None
        try:
            socket = connect(
                url,
                open_timeout=min(PUSH_OPEN_TIMEOUT, remaining),
                close_timeout=PUSH_CLOSE_TIMEOUT,
            )
        except (OSError, WebSocketException) as exc:  # refused, timed out, TLS, HTTP 4xx
            _log.info("push unavailable, polling instead: %s", type(exc).__name__)
            return None
        with socket:
            return self._await_pushed(socket, task_id, deadline, on_update)

    def _await_pushed(
        self,
        socket: ClientConnection,
        task_id: str,
        deadline: float,
        on_update: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any] | None:
        next_check = time.monotonic()  # read once now: it may have ended before we connected
        while True:
            now = time.monotonic()
            if now >= next_check:
                task = self.get_task(task_id)
                if on_update is not None:
                    on_update(task)
                if task.get("status") in TERMINAL_STATUSES:
                    return task
                next_check = time.monotonic() + self.push_check_interval
                now = time.monotonic()
            if now >= deadline:
                return None
            try:
                frame = socket.recv(timeout=max(min(deadline, next_check) - now, 0.0))
            except TimeoutError:
                continue
            except (OSError, WebSocketException) as exc:  # closed by the API or the network
                _log.info("push connection lost, polling instead: %s", type(exc).__name__)
                return None
            pushed = pushed_task(frame, task_id)
            if pushed is None:
                continue
            if on_update is not None:  # its end, or (running) its progress or cancel asked
                on_update(pushed)
            if pushed.get("status") in TERMINAL_STATUSES:
                return pushed

    # -- speech ---------------------------------------------------------------------------

    def transcribe(
        self,
        audio: AudioSource,
        *,
        filename: str | None = None,
        content_type: str | None = None,
        language: str | None = None,
        prompt: str | None = None,
    ) -> dict[str, Any]:
        """Transcribe a clip synchronously: multipart `POST /api/v1/speech/transcribe`.

        `filename` defaults to a path's name (give it for bytes or a stream), `content_type`
        to what the name's extension implies. Returns `{"code", "language",
        "language_probability", "duration", "text", "segments": [{"start", "end", "text"}]}`.
        A request over `sync_max_bytes` (the API's SYNC_AUDIO_MAX_BYTES) raises ApiError 413
        (code PAYLOAD_TOO_LARGE) before anything is sent: use `submit_speech` for long audio.
        """
        name = filename or _source_name(audio)
        if not name:
            raise ValueError("a filename is needed when the audio is not a path")
        ctype = content_type or audio_content_type(name)
        with _opened(audio) as stream:
            size = _remaining(stream)
            if size is not None:
                self._check_sync_size(
                    transcribe_request_size(
                        size, filename=name, content_type=ctype, language=language, prompt=prompt
                    )
                )
            data = stream.read()
        fields = _form_fields(name, ctype, data, language=language, prompt=prompt)
        body, form_type = encode_multipart_formdata(fields)
        self._check_sync_size(len(body))
        response = self._request(
            "POST",
            "/api/v1/speech/transcribe",
            data=body,
            headers={"Content-Type": form_type},
        )
        return self._object(response)

    def transcribe_pcm(
        self,
        data: AudioSource,
        *,
        sample_rate: int = 16000,
        channels: int = 1,
        language: str | None = None,
    ) -> dict[str, Any]:
        """Transcribe raw 16-bit little-endian PCM synchronously: `POST /api/v1/speech/pcm`.

        Same answer as `transcribe`; over `sync_max_bytes`: ApiError 413 before sending.
        """
        with _opened(data) as stream:
            size = _remaining(stream)
            if size is not None:
                self._check_sync_size(size)
            pcm = stream.read()
        self._check_sync_size(len(pcm))
        params: dict[str, str | int] = {"sample_rate": sample_rate, "channels": channels}
        if language:
            params["language"] = language
        response = self._request(
            "POST",
            "/api/v1/speech/pcm",
            data=pcm,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
        )
        return self._object(response)

    def start_async_transcription(
        self,
        filename: str,
        size_bytes: int,
        content_type: str | None = None,
        language: str | None = None,
        prompt: str | None = None,
    ) -> dict[str, Any]:
        """Create a speech task awaiting its upload: `POST /api/v1/speech/async`.

        Returns the 202 answer: `{"task_id", "status": "AWAITING_UPLOAD", "upload_url",
        "upload_method", "upload_headers", "expires_in", "message"}`; PUT the file there with
        `upload`. `content_type` defaults to what the name's extension implies, when known.
        """
        payload: dict[str, Any] = {"filename": filename, "size_bytes": size_bytes}
        ctype = content_type or AUDIO_CONTENT_TYPES.get(_extension(filename))
        optional = {"content_type": ctype, "language": language, "prompt": prompt}
        payload.update({key: value for key, value in optional.items() if value})
        response = self._request("POST", "/api/v1/speech/async", json=payload)
        body = self._object(response)
        headers = body.get("upload_headers", {})
        if (
            not isinstance(body.get("task_id"), str)
            or not isinstance(body.get("upload_url"), str)
            or not isinstance(headers, dict)
        ):
            raise ApiError(
                response.status_code, "BAD_RESPONSE", "no task_id/upload_url in the answer"
            )
        return body

    def upload(
        self,
        upload_url: str,
        headers: Mapping[str, str],
        source: AudioSource,
        *,
        size: int | None = None,
        method: str = "PUT",
        progress: ProgressCallback | None = None,
    ) -> None:
        """Send `source` to a presigned URL with exactly `headers`, streamed in chunks.

        The URL is signed for an exact Content-Length: `size` bytes are sent (default: all
        that is left of the file), never more; a file that turns out shorter raises
        ValueError. No Authorization header goes to the storage host. `progress(sent, total)`
        is called as the bytes go out, last with `sent == total`. A refusal (S3's XML
        error) raises ApiError with S3's code and message.
        """
        with _opened(source) as stream:
            total = size if size is not None else _remaining(stream)
            if total is None:
                raise ValueError("size is needed for a stream that cannot seek")
            send: dict[str, str | None] = {}
            for name, value in headers.items():
                if name.lower() == "content-length":
                    if str(value).strip() != str(total):
                        raise ValueError(f"the upload is signed for {value} bytes, not {total}")
                    continue  # requests sets it from the body
                send[name] = value
            # The presigned URL carries its own signature: a second auth mechanism is refused
            # (and a token must not leak to another host), so drop any session-level one.
            send["Authorization"] = None
            body = _CountedBody(stream, total, progress)
            response = self.session.request(
                method,
                upload_url,
                data=body if total else b"",
                headers=send,
                timeout=self.timeout,
            )
        if not response.ok:
            raise ApiError.from_response(response)
        if progress is not None and total == 0:
            progress(0, 0)

    def submit_speech(
        self,
        source: AudioSource,
        *,
        filename: str | None = None,
        content_type: str | None = None,
        language: str | None = None,
        prompt: str | None = None,
        size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Long audio: start an async transcription, upload the file; the 202 answer.

        Follow the task with `wait(task_id)`, then fetch the result with `transcript`.
        """
        name = filename or _source_name(source)
        if not name:
            raise ValueError("a filename is needed when the audio is not a path")
        with _opened(source) as stream:
            total = size if size is not None else _remaining(stream)
            if total is None:
                raise ValueError("size is needed for a stream that cannot seek")
            started = self.start_async_transcription(
                name,
                total,
                content_type=content_type or audio_content_type(name),
                language=language,
                prompt=prompt,
            )
            self.upload(
                str(started["upload_url"]),
                {str(k): str(v) for k, v in started.get("upload_headers", {}).items()},
                stream,
                size=total,
                method=str(started.get("upload_method") or "PUT"),
                progress=progress,
            )
        return started

    def transcript(self, task_id: str) -> dict[str, Any]:
        """A DONE speech task's full transcript (409 until then), shaped like `transcribe`'s."""
        path = f"/api/v1/speech/transcripts/{_segment(task_id)}"
        return self._object(self._request("GET", path))

    def _check_sync_size(self, size: int) -> None:
        if size > self.sync_max_bytes:
            raise ApiError(
                413,
                "PAYLOAD_TOO_LARGE",
                f"the request would be {size} bytes, over the synchronous limit of "
                f"{self.sync_max_bytes} bytes: send long audio asynchronously (submit_speech)",
            )

    # -- GPU endpoints (operators: the Cognito group `admin`) -----------------------------

    def list_endpoints(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every GPU endpoint (of `kind`): configuration, health, in-flight calls."""
        params = {"kind": kind} if kind else None
        response = self._request("GET", "/api/v1/admin/endpoints", params=params)
        body = self._json(response)
        if not isinstance(body, list):
            raise ApiError(response.status_code, "BAD_RESPONSE", "expected a JSON array")
        return [item for item in body if isinstance(item, dict)]

    def put_endpoint(self, endpoint_id: str, **spec: Any) -> dict[str, Any]:
        """Add or replace an endpoint: `url`, `kind`, `protocol`, `capacity`, `weight`, `state`,
        `callback` (cog only: predictions reported by webhook), `credentials` (where its key
        is kept: {"type": "bearer", "secret": name}, or {"type": "header", "header":
        "X-Api-Key", "parameter": name}; never the key).

        Options left None are not sent, so the API's defaults apply to them (a PUT replaces
        the configuration: credentials left out are removed).
        """
        body = {key: value for key, value in spec.items() if value is not None}
        path = f"/api/v1/admin/endpoints/{_segment(endpoint_id)}"
        return self._object(self._request("PUT", path, json=body))

    def drain_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """No new work for the endpoint; calls already running finish."""
        path = f"/api/v1/admin/endpoints/{_segment(endpoint_id)}/drain"
        return self._object(self._request("POST", path))

    def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        path = f"/api/v1/admin/endpoints/{_segment(endpoint_id)}"
        return self._object(self._request("DELETE", path))

    # -- plumbing -------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        json: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        allow_redirects: bool = True,
    ) -> requests.Response:
        sent = {"Accept": "application/json", **(headers or {})}
        if auth and self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        response = self.session.request(
            method,
            self.api_url + path,
            headers=sent,
            json=json,
            data=data,
            params=params,
            timeout=self.timeout,
            allow_redirects=allow_redirects,
        )
        expected_redirect = not allow_redirects and response.status_code in _REDIRECTS
        if not (200 <= response.status_code < 300 or expected_redirect):
            raise ApiError.from_response(response)
        push_url = response.headers.get(PUSH_URL_HEADER)
        if push_url:
            self.push_url = push_url.strip()
        return response

    @staticmethod
    def _json(response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "BAD_RESPONSE", "the answer is not JSON") from exc

    @classmethod
    def _object(cls, response: requests.Response) -> dict[str, Any]:
        body = cls._json(response)
        if not isinstance(body, dict):
            raise ApiError(response.status_code, "BAD_RESPONSE", "expected a JSON object")
        return body


def _segment(value: str) -> str:
    return quote(value, safe="")


# -- speech helpers ---------------------------------------------------------------------------


def audio_content_type(filename: str) -> str:
    """The content type to send a file as, from its extension."""
    known = AUDIO_CONTENT_TYPES.get(_extension(filename))
    if known is not None:
        return known
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def transcribe_request_size(
    size: int,
    *,
    filename: str,
    content_type: str,
    language: str | None = None,
    prompt: str | None = None,
) -> int:
    """The exact body size of `transcribe`'s multipart request for a file of `size` bytes.

    Framing (boundaries, part headers, the text fields) measured by encoding the same form
    around an empty file: the boundary's length is fixed, so the sum is exact.
    """
    empty = _form_fields(filename, content_type, b"", language=language, prompt=prompt)
    body, _ = encode_multipart_formdata(empty)
    return len(body) + size


def fits_sync(
    size: int,
    *,
    filename: str,
    content_type: str | None = None,
    language: str | None = None,
    prompt: str | None = None,
    limit: int | None = None,
) -> bool:
    """Whether `transcribe` may send a file of `size` bytes (else: `submit_speech`)."""
    needed = transcribe_request_size(
        size,
        filename=filename,
        content_type=content_type or audio_content_type(filename),
        language=language,
        prompt=prompt,
    )
    return needed <= (SYNC_AUDIO_MAX_BYTES if limit is None else limit)


def wav_header(data_bytes: int, *, sample_rate: int, channels: int) -> bytes:
    """The 44-byte header that makes `data_bytes` of raw 16-bit PCM a WAV file."""
    block_align = channels * PCM_SAMPLE_WIDTH
    return b"".join(
        (
            b"RIFF",
            struct.pack("<I", 36 + data_bytes),
            b"WAVE",
            b"fmt ",
            struct.pack(
                "<IHHIIHH",
                16,  # the fmt chunk's size
                1,  # PCM
                channels,
                sample_rate,
                sample_rate * block_align,  # byte rate
                block_align,
                8 * PCM_SAMPLE_WIDTH,
            ),
            b"data",
            struct.pack("<I", data_bytes),
        )
    )


class ChainedReader:
    """Several readables read one after the other (e.g. a WAV header, then raw PCM)."""

    def __init__(self, *parts: Readable) -> None:
        self._parts = list(parts)

    def read(self, size: int = -1, /) -> bytes:
        out = bytearray()
        while self._parts and (size < 0 or len(out) < size):
            chunk = self._parts[0].read(-1 if size < 0 else size - len(out))
            if chunk:
                out += chunk
            else:
                self._parts.pop(0)
        return bytes(out)


def _form_fields(
    filename: str,
    content_type: str,
    data: bytes,
    *,
    language: str | None,
    prompt: str | None,
) -> list[tuple[str, str | tuple[str, bytes, str]]]:
    fields: list[tuple[str, str | tuple[str, bytes, str]]] = []
    if language:
        fields.append(("language", language))
    if prompt:
        fields.append(("prompt", prompt))
    fields.append(("file", (filename, data, content_type)))
    return fields


def _extension(filename: str) -> str:
    return os.path.splitext(filename.strip())[1].lower()


def _source_name(source: AudioSource) -> str | None:
    if isinstance(source, str | os.PathLike):
        return Path(source).name
    name = getattr(source, "name", None)  # an open file
    return Path(name).name if isinstance(name, str) and name else None


@contextmanager
def _opened(source: AudioSource) -> Iterator[Readable]:
    """A readable over `source`; a path is opened (and closed), a stream used as it is."""
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as stream:
            yield stream
    else:
        yield source


def _remaining(stream: Readable) -> int | None:
    """Bytes left from the stream's position to its end, or None when it cannot seek."""
    tell = getattr(stream, "tell", None)
    seek = getattr(stream, "seek", None)
    if tell is None or seek is None:
        return None
    try:
        here = int(tell())
        end = int(seek(0, os.SEEK_END))
        seek(here)
    except (OSError, ValueError):
        return None
    return max(end - here, 0)


class _CountedBody:
    """An upload body of exactly `total` bytes, read in chunks, reporting progress.

    requests takes its length from `__len__` (so it sends Content-Length, not chunked
    encoding) and http.client streams it through `read`: the file is never all in memory.
    """

    def __init__(self, stream: Readable, total: int, progress: ProgressCallback | None) -> None:
        self._stream = stream
        self.total = total
        self.sent = 0
        self._progress = progress

    def __len__(self) -> int:
        return self.total

    def read(self, size: int = -1, /) -> bytes:
        left = self.total - self.sent
        if left <= 0:
            return b""
        want = left if size is None or size < 0 else min(size, left)
        chunk = self._stream.read(min(want, _UPLOAD_CHUNK))
        if not chunk:
            raise ValueError(
                f"the file ended after {self.sent} of the {self.total} bytes announced"
            )
        self.sent += len(chunk)
        if self._progress is not None:
            self._progress(self.sent, self.total)
        return chunk
