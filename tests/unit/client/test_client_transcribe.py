"""`gpuqueue transcribe` and the client's speech methods against a fake API and a fake S3.

Both fakes are stdlib HTTP servers on 127.0.0.1 port 0 that play the server's side of the
speech contract: the synchronous multipart and raw-PCM routes (with the 4,000,000-byte
request limit), the async route that hands out a presigned PUT, an S3 that checks the
signed headers and length the way S3 does, and tasks that move AWAITING_UPLOAD -> QUEUED
-> RUNNING -> DONE one step per poll once the upload has landed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
import threading
import uuid
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from typer.testing import CliRunner, Result

from fakes import Reply, Request, reply, serve

CLIENT_DIR = Path(__file__).resolve().parents[3] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client import (  # noqa: E402
    SYNC_AUDIO_MAX_BYTES,
    ApiError,
    ChainedReader,
    GpuqueueClient,
    audio_content_type,
    fits_sync,
    transcribe_request_size,
    wav_header,
)
from gpuqueue_client.cli import app  # noqa: E402

TOKEN = "tok-alice"
FAST_POLL = ["--poll-interval", "0.01"]
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))  # enough of a WAV for the fakes
TRANSCRIPT = {
    "code": 0,
    "language": "en",
    "language_probability": 0.98,
    "duration": 1.5,
    "text": "hello world",
    "segments": [{"start": 0.0, "end": 1.5, "text": "hello world"}],
}
SSE = {"x-amz-server-side-encryption": "AES256"}  # a signed header S3 insists on getting


def api_error(status: int, message: str, code: str, fld: str | None = None) -> Reply:
    return reply(status, {"error": message, "code": code} | ({"field": fld} if fld else {}))


@dataclass
class SpeechTask:
    task_id: str
    filename: str
    size_bytes: int
    content_type: str
    script: list[str]
    uploaded: bytes | None = None
    polls: int = 0

    @property
    def status(self) -> str:
        if self.uploaded is None:
            return "AWAITING_UPLOAD"
        return self.script[min(self.polls, len(self.script) - 1)]

    def view(self) -> dict[str, Any]:
        status = self.status
        done = status == "DONE"
        return {
            "task_id": self.task_id,
            "kind": "speech",
            "status": status,
            "attempt": 1,
            "text": TRANSCRIPT["text"] if done else None,
            "result_url": f"/api/v1/speech/transcripts/{self.task_id}" if done else None,
            "error": "the speech endpoint refused the audio" if status == "FAILED" else None,
        }


@dataclass
class FakeSpeechApi:
    """The speech routes of the contract, and the presigned-upload host."""

    url: str = ""
    s3_url: str = ""
    limit: int = SYNC_AUDIO_MAX_BYTES  # the API's own copy of the sync limit
    script: list[str] = field(default_factory=lambda: ["QUEUED", "RUNNING", "DONE"])
    fail_next: Reply | None = None  # the next API call answers this
    upload_error: Reply | None = None  # S3 answers this to every PUT
    requests: list[Request] = field(default_factory=list)
    uploads: list[Request] = field(default_factory=list)
    tasks: dict[str, SpeechTask] = field(default_factory=dict)
    crashes: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def routes(self, method: str, prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def handle(self, request: Request) -> Reply:
        with self.lock:
            self.requests.append(request)
            try:
                return self._route(request)
            except Exception as exc:  # a bug in the fake: fail the test at teardown
                self.crashes.append(exc)
                return api_error(500, f"fake API crashed: {exc!r}", "INTERNAL")

    def _route(self, request: Request) -> Reply:  # noqa: PLR0911 - one return per route
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return reply(401, {"message": "Unauthorized"})
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            return failure
        method, path = request.method, request.path
        if len(request.body) > self.limit:
            return api_error(413, f"the request is over {self.limit} bytes", "PAYLOAD_TOO_LARGE")
        if (method, path) == ("POST", "/api/v1/speech/transcribe"):
            return self._transcribe(request)
        if (method, path) == ("POST", "/api/v1/speech/pcm"):
            return self._pcm(request)
        if (method, path) == ("POST", "/api/v1/speech/async"):
            return self._start(request.json())
        if method == "GET" and (match := re.fullmatch(r"/api/v1/tasks/([^/]+)", path)):
            task = self.tasks.get(match[1])
            if task is None:
                return api_error(404, "task not found", "NOT_FOUND")
            view = task.view()
            if task.uploaded is not None:
                task.polls += 1  # one step per poll, once the upload has landed
            return reply(200, view)
        if method == "GET" and (match := re.fullmatch(r"/api/v1/speech/transcripts/(.+)", path)):
            task = self.tasks.get(match[1])
            if task is None:
                return api_error(404, "task not found", "NOT_FOUND")
            if task.status != "DONE":
                return api_error(409, f"task {task.task_id} is {task.status}", "CONFLICT")
            return reply(200, TRANSCRIPT)
        return api_error(404, "no such route", "NOT_FOUND")

    def _transcribe(self, request: Request) -> Reply:
        if not request.headers.get("Content-Type", "").startswith("multipart/form-data"):
            return api_error(415, "send multipart/form-data", "UNSUPPORTED_MEDIA_TYPE", "file")
        if "file" not in request.form():
            return api_error(400, "the field 'file' is required", "INVALID_INPUT", "file")
        return reply(200, TRANSCRIPT)

    def _pcm(self, request: Request) -> Reply:
        if len(request.body) % 2:
            message = (
                f"odd byte count: 16-bit PCM needs an even number of bytes, got {len(request.body)}"
            )
            return api_error(400, message, "INVALID_INPUT", "body")
        return reply(200, TRANSCRIPT | {"duration": len(request.body) / 32000})

    def _start(self, body: dict[str, Any]) -> Reply:
        if body.get("size_bytes", 0) > 100_000_000:
            return api_error(
                413, "size_bytes: at most 200000000", "PAYLOAD_TOO_LARGE", "size_bytes"
            )
        task = SpeechTask(
            task_id=str(uuid.uuid4()),
            filename=body["filename"],
            size_bytes=body["size_bytes"],
            content_type=body.get("content_type") or "application/octet-stream",
            script=list(self.script),
        )
        self.tasks[task.task_id] = task
        return reply(
            202,
            {
                "task_id": task.task_id,
                "status": "AWAITING_UPLOAD",
                "upload_url": f"{self.s3_url}/audio/{task.task_id}?X-Amz-Signature=abc123",
                "upload_method": "PUT",
                "upload_headers": {"Content-Type": task.content_type, **SSE},
                "expires_in": 900,
                "message": "PUT the audio to upload_url",
            },
        )

    def handle_s3(self, request: Request) -> Reply:
        with self.lock:
            self.uploads.append(request)
            match = re.fullmatch(r"/audio/([^/]+)", request.path)
            task = self.tasks.get(match[1]) if match else None
            if request.method != "PUT" or task is None:
                return s3_error(404, "NoSuchKey")
            if self.upload_error is not None:
                return self.upload_error
            if request.headers.get("Authorization"):
                return s3_error(400, "InvalidArgument", "Only one auth mechanism allowed")
            signed = {"Content-Type": task.content_type, **SSE}
            if any(request.headers.get(k) != v for k, v in signed.items()):
                return s3_error(403, "SignatureDoesNotMatch", "a signed header differs")
            if request.headers.get("Content-Length") != str(task.size_bytes):
                return s3_error(403, "SignatureDoesNotMatch", "Content-Length is signed")
            task.uploaded = request.body  # the S3 event: the task is queued
            return 200, {"ETag": '"etag"'}, b""


def s3_error(status: int, code: str, message: str = "") -> Reply:
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return status, {"Content-Type": "application/xml"}, body.encode()


@pytest.fixture
def api() -> Iterator[FakeSpeechApi]:
    fake = FakeSpeechApi()
    with serve(fake.handle_s3) as s3_url, serve(fake.handle) as url:
        fake.url, fake.s3_url = url, s3_url
        yield fake
    assert not fake.crashes, fake.crashes


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPUQUEUE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("GPUQUEUE_TOKEN", raising=False)
    monkeypatch.delenv("GPUQUEUE_API_URL", raising=False)


Invoke = Callable[..., Result]


@pytest.fixture
def cli(api: FakeSpeechApi, tmp_path: Path) -> Invoke:
    runner = CliRunner()

    def invoke(*args: str, token: str | None = TOKEN, tty: bool = False) -> Result:
        env = {
            "GPUQUEUE_API_URL": api.url,
            "GPUQUEUE_CONFIG_DIR": str(tmp_path / "config"),
            "GPUQUEUE_TOKEN": token,
            "COLUMNS": "160",
            "NO_COLOR": "1",
            # Rich's switch for "draw as on a terminal": the live progress bar.
            "TTY_COMPATIBLE": "1" if tty else None,
        }
        return runner.invoke(app, ["transcribe", *args], env=env)

    return invoke


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """The client's copy of the sync limit, lowered so that 'long' audio stays small."""
    monkeypatch.setattr(GpuqueueClient, "sync_max_bytes", 4096)
    return 4096


@pytest.fixture
def client(api: FakeSpeechApi) -> GpuqueueClient:
    return GpuqueueClient(api.url, TOKEN, timeout=10)


def one_line(text: str) -> str:
    return " ".join(text.split())


def audio_file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes((WAV * (size // len(WAV) + 1))[:size])
    return path


# -- the synchronous route --------------------------------------------------------------------


def test_a_short_file_is_answered_synchronously_with_its_fields(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path
) -> None:
    clip = audio_file(tmp_path, "clip.wav", 2000)

    result = cli(str(clip), "--language", "en", "--prompt", "Gödel, Escher")

    assert result.exit_code == 0, result.output
    assert result.stdout == "hello world\n"
    assert result.stderr.strip() == "language: en (probability 0.98), duration: 1.5 s"
    (sent,) = api.requests
    assert (sent.method, sent.path) == ("POST", "/api/v1/speech/transcribe")
    form = sent.form()
    assert form["file"].get_filename() == "clip.wav"
    assert form["file"].get_content_type() == "audio/wav"
    assert form["file"].get_payload(decode=True) == clip.read_bytes()
    assert form["language"].get_content() == "en"
    assert form["prompt"].get_payload(decode=True).decode() == "Gödel, Escher"
    assert api.uploads == []


def test_json_prints_the_apis_answer(cli: Invoke, tmp_path: Path) -> None:
    result = cli(str(audio_file(tmp_path, "clip.mp3", 100)), "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == TRANSCRIPT


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("a.wav", "audio/wav"),
        ("a.MP3", "audio/mpeg"),
        ("a.flac", "audio/flac"),
        ("a.ogg", "audio/ogg"),
        ("a.opus", "audio/ogg"),
        ("a.webm", "audio/webm"),
        ("a.m4a", "audio/mp4"),
        ("a.aiff", "audio/x-aiff"),  # not ours: mimetypes' guess, and the API says 415
        ("a.unknownext", "application/octet-stream"),
    ],
)
def test_the_content_type_follows_the_extension(name: str, content_type: str) -> None:
    assert audio_content_type(name) == content_type


def test_the_sync_limit_is_the_whole_request_at_the_apis_own_number(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path
) -> None:
    # The real limit, no patching: a request of exactly 4,000,000 bytes is the largest
    # sent synchronously; one byte more of audio goes to S3.
    framing = transcribe_request_size(0, filename="edge.wav", content_type="audio/wav")
    edge = audio_file(tmp_path, "edge.wav", SYNC_AUDIO_MAX_BYTES - framing)

    result = cli(str(edge))

    assert result.exit_code == 0, result.output
    (sent,) = api.requests
    assert len(sent.body) == SYNC_AUDIO_MAX_BYTES
    assert api.uploads == []

    over = audio_file(tmp_path, "over.wav", SYNC_AUDIO_MAX_BYTES - framing + 1)
    result = cli(str(over), *FAST_POLL)

    assert result.exit_code == 0, result.output
    assert [r.path for r in api.requests[1:2]] == ["/api/v1/speech/async"]
    (upload,) = api.uploads
    assert upload.body == over.read_bytes()


def test_a_413_from_the_sync_route_falls_back_to_the_upload(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path
) -> None:
    api.limit = 1000  # the API's limit was lowered; this client does not know yet
    clip = audio_file(tmp_path, "clip.wav", 1500)

    result = cli(str(clip), *FAST_POLL)

    assert result.exit_code == 0, result.output
    assert "uploading it for a task instead" in result.stderr
    assert [r.path for r in api.requests[:2]] == [
        "/api/v1/speech/transcribe",
        "/api/v1/speech/async",
    ]
    assert api.uploads[0].body == clip.read_bytes()
    assert result.stdout == "hello world\n"


# -- the async route: start, signed upload, wait ----------------------------------------------


def test_a_long_file_is_uploaded_with_exactly_the_signed_headers_then_waited_for(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    clip = audio_file(tmp_path, "talk.m4a", 3 * small_limit)

    result = cli(str(clip), "--language", "de", "--prompt", "Kafka", *FAST_POLL)

    assert result.exit_code == 0, result.output
    assert result.stdout == "hello world\n"
    start = api.routes("POST", "/api/v1/speech/async")[0]
    assert start.json() == {
        "filename": "talk.m4a",
        "size_bytes": clip.stat().st_size,
        "content_type": "audio/mp4",
        "language": "de",
        "prompt": "Kafka",
    }
    assert api.routes("POST", "/api/v1/speech/transcribe") == []
    (upload,) = api.uploads
    assert upload.body == clip.read_bytes()
    assert upload.headers["Content-Length"] == str(clip.stat().st_size)
    assert upload.headers["Content-Type"] == "audio/mp4"
    assert upload.headers["x-amz-server-side-encryption"] == "AES256"
    assert "Authorization" not in upload.headers
    assert "Transfer-Encoding" not in upload.headers
    (task,) = api.tasks.values()
    polls = api.routes("GET", f"/api/v1/tasks/{task.task_id}")
    assert len(polls) == 3  # QUEUED, RUNNING, DONE
    assert api.routes("GET", "/api/v1/speech/transcripts/")
    assert f"task {task.task_id} DONE in" in result.stderr
    assert "language: en (probability 0.98), duration: 1.5 s" in result.stderr


def test_async_forces_the_upload_for_a_short_file(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path
) -> None:
    clip = audio_file(tmp_path, "short.wav", 500)

    result = cli(str(clip), "--async", "--json", *FAST_POLL)

    assert result.exit_code == 0, result.output
    assert api.uploads[0].body == clip.read_bytes()
    assert json.loads(result.stdout) == TRANSCRIPT


def test_the_upload_progress_logs_quarters_off_a_terminal(
    cli: Invoke, tmp_path: Path, small_limit: int
) -> None:
    clip = audio_file(tmp_path, "talk.wav", 2_000_000)

    result = cli(str(clip), *FAST_POLL)

    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("upload")]
    assert lines[0] == "uploading talk.wav (2.0 MB)"
    assert [line.split()[1] for line in lines[1:]] == ["25%", "50%", "75%", "100%"]
    assert "(2.0 MB of 2.0 MB" in lines[-1]


def test_the_upload_progress_bar_reaches_100_percent_on_a_terminal(
    cli: Invoke, tmp_path: Path, small_limit: int
) -> None:
    clip = audio_file(tmp_path, "talk.wav", 300_000)

    result = cli(str(clip), *FAST_POLL, tty=True)

    assert result.exit_code == 0, result.output
    last = [line for line in result.stderr.splitlines() if "uploading talk.wav" in line][-1]
    assert "100%" in last
    assert "300.0/300.0 kB" in last


def test_no_wait_prints_the_task_id_and_transcript_fetches_it_later(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    result = cli(str(audio_file(tmp_path, "talk.wav", 5000)), "--no-wait")

    assert result.exit_code == 0, result.output
    (task,) = api.tasks.values()
    assert result.stdout == f"{task.task_id}\n"
    assert f"`gpuqueue transcript {task.task_id}`" in one_line(result.stderr)
    assert api.routes("GET", "/api/v1/tasks/") == []

    runner = CliRunner()
    env = {"GPUQUEUE_API_URL": api.url, "GPUQUEUE_TOKEN": TOKEN, "NO_COLOR": "1"}
    early = runner.invoke(app, ["transcript", task.task_id], env=env)
    assert early.exit_code == 1
    assert early.stderr.strip() == f"error: task {task.task_id} is QUEUED"

    task.polls = 99  # the worker got to it
    done = runner.invoke(app, ["transcript", task.task_id, "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == TRANSCRIPT


def test_no_wait_json_prints_the_202_answer(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    result = cli(str(audio_file(tmp_path, "talk.wav", 5000)), "--no-wait", "--json")

    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["status"] == "AWAITING_UPLOAD"
    assert body["task_id"] in api.tasks


def test_a_failed_task_says_why_and_exits_1(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    api.script = ["QUEUED", "FAILED"]

    result = cli(str(audio_file(tmp_path, "talk.wav", 5000)), *FAST_POLL)

    assert result.exit_code == 1
    (task_id,) = api.tasks
    assert f"error: task {task_id} failed: the speech endpoint refused the audio" in result.stderr
    assert result.stdout == ""


def test_waiting_gives_up_after_the_timeout(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    api.script = ["QUEUED", "RUNNING"]

    result = cli(str(audio_file(tmp_path, "talk.wav", 5000)), "--timeout", "0.1", *FAST_POLL)

    assert result.exit_code == 1
    (task_id,) = api.tasks
    assert "not finished after 0.1 s" in result.stderr
    assert f"`gpuqueue transcript {task_id}`" in one_line(result.stderr)


def test_a_refused_upload_names_s3s_reason(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    api.upload_error = s3_error(403, "AccessDenied", "Request has expired")

    result = cli(str(audio_file(tmp_path, "talk.wav", 5000)), *FAST_POLL)

    assert result.exit_code == 1
    (task_id,) = api.tasks
    assert result.stderr.splitlines()[-1] == (
        f"error: the upload for task {task_id} was refused (403 AccessDenied): Request has expired"
    )
    assert api.routes("GET", "/api/v1/tasks/") == []


# -- raw PCM ------------------------------------------------------------------------------------


def test_pcm_posts_octet_stream_with_the_rate_and_channels(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path
) -> None:
    raw = tmp_path / "mic.pcm"
    raw.write_bytes(bytes(range(256)) * 125)  # 32,000 bytes: 0.5 s of 16 kHz stereo

    result = cli("--pcm", str(raw), "--sample-rate", "16000", "--channels", "2", "--language", "en")

    assert result.exit_code == 0, result.output
    assert result.stdout == "hello world\n"
    (sent,) = api.requests
    assert (sent.method, sent.path) == ("POST", "/api/v1/speech/pcm")
    assert sent.query == {"sample_rate": ["16000"], "channels": ["2"], "language": ["en"]}
    assert sent.headers["Content-Type"] == "application/octet-stream"
    assert sent.body == raw.read_bytes()


def test_pcm_defaults_to_16_khz_mono(cli: Invoke, api: FakeSpeechApi, tmp_path: Path) -> None:
    raw = tmp_path / "mic.raw"
    raw.write_bytes(b"\x01\x00" * 100)

    result = cli(str(raw), "--pcm")

    assert result.exit_code == 0, result.output
    assert api.requests[0].query == {"sample_rate": ["16000"], "channels": ["1"]}


def test_long_pcm_is_uploaded_as_a_wav(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    raw = tmp_path / "mic.pcm"
    pcm = bytes(range(200)) * 60  # 12,000 bytes over the (lowered) limit
    raw.write_bytes(pcm)

    result = cli("--pcm", str(raw), "--sample-rate", "8000", *FAST_POLL)

    assert result.exit_code == 0, result.output
    start = api.routes("POST", "/api/v1/speech/async")[0].json()
    assert start == {
        "filename": "mic.wav",
        "size_bytes": len(pcm) + 44,
        "content_type": "audio/wav",
    }
    (upload,) = api.uploads
    with wave.open(io.BytesIO(upload.body)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        assert wav.readframes(wav.getnframes()) == pcm


def test_odd_pcm_is_refused_by_the_api_or_before_the_upload(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "mic.pcm"
    raw.write_bytes(b"\x00" * 4097)

    result = cli("--pcm", str(raw))

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: odd byte count: 16-bit PCM needs an even number of bytes, got 4097 (field: body)"
    )

    monkeypatch.setattr(GpuqueueClient, "sync_max_bytes", 4096)
    result = cli("--pcm", str(raw))

    assert result.exit_code == 1
    assert "4097 bytes is not a whole number of 1-channel 16-bit frames" in result.stderr
    assert api.routes("POST", "/api/v1/speech/async") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sample-rate", "8000"], "error: --sample-rate and --channels go with --pcm"),
        (["--channels", "2"], "error: --sample-rate and --channels go with --pcm"),
        (["--pcm", "--prompt", "hi"], "error: --prompt does not go with --pcm"),
    ],
)
def test_options_that_do_not_fit_together(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, args: list[str], message: str
) -> None:
    result = cli(str(audio_file(tmp_path, "clip.wav", 100)), *args)

    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert api.requests == []


def test_a_raw_pcm_file_without_pcm_gets_a_hint(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path
) -> None:
    raw = tmp_path / "mic.pcm"
    raw.write_bytes(b"\x00\x00")

    result = cli(str(raw))

    assert result.exit_code == 1
    assert result.stderr.strip() == "error: mic.pcm looks like raw PCM: add --pcm"
    assert api.requests == []


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            reply(
                503,
                {"error": "no healthy speech endpoint", "code": "SERVICE_UNAVAILABLE"},
                {"Retry-After": "5"},
            ),
            "error: no speech endpoint available, retry in 5 s (no healthy speech endpoint)",
        ),
        (
            reply(503, {"error": "the queue is full", "code": "QUEUE_FULL"}, {"Retry-After": "7"}),
            "error: queue full, retry in 7 s (the queue is full)",
        ),
        (
            api_error(
                415,
                "file: unsupported audio format (accepted: wav, mp3, flac, ogg, webm, m4a)",
                "UNSUPPORTED_MEDIA_TYPE",
                "file",
            ),
            "error: file: unsupported audio format (accepted: wav, mp3, flac, ogg, webm, m4a) "
            "(field: file)",
        ),
        (
            api_error(504, "the speech endpoint did not answer in 25 s", "UPSTREAM_TIMEOUT"),
            "error: the speech endpoint did not answer in time "
            "(the speech endpoint did not answer in 25 s)",
        ),
        (
            api_error(422, "the audio could not be decoded", "UNPROCESSABLE_AUDIO", "file"),
            "error: the audio could not be decoded (field: file)",
        ),
        (
            (502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>"),
            "error: <html>Bad Gateway</html>",
        ),
    ],
)
def test_api_errors_read_as_one_clear_line(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, failure: Reply, message: str
) -> None:
    api.fail_next = failure

    result = cli(str(audio_file(tmp_path, "clip.wav", 100)))

    assert result.exit_code == 1
    assert one_line(result.stderr) == message
    assert result.stdout == ""


def test_async_start_errors_read_the_same(
    cli: Invoke, api: FakeSpeechApi, tmp_path: Path, small_limit: int
) -> None:
    api.fail_next = reply(
        503, {"error": "no speech endpoint", "code": "SERVICE_UNAVAILABLE"}, {"Retry-After": "9"}
    )

    result = cli(str(audio_file(tmp_path, "talk.wav", 5000)))

    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        "error: no speech endpoint available, retry in 9 s (no speech endpoint)"
    )
    assert api.uploads == []


def test_a_refused_token_says_log_in(cli: Invoke, tmp_path: Path) -> None:
    result = cli(str(audio_file(tmp_path, "clip.wav", 100)), token="forged")

    assert result.exit_code == 1
    assert result.stderr.strip() == "error: not logged in or token expired: run `gpuqueue login`"


def test_a_missing_file_is_a_usage_error(cli: Invoke, api: FakeSpeechApi, tmp_path: Path) -> None:
    result = cli(str(tmp_path / "nope.wav"))

    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert api.requests == []


# -- the client --------------------------------------------------------------------------------


def test_client_transcribe_sends_the_size_it_computed(
    api: FakeSpeechApi, client: GpuqueueClient
) -> None:
    audio = WAV * 10

    body = client.transcribe(audio, filename="x.flac", language="en", prompt="p")

    assert body == TRANSCRIPT
    (sent,) = api.requests
    expected = transcribe_request_size(
        len(audio), filename="x.flac", content_type="audio/flac", language="en", prompt="p"
    )
    assert len(sent.body) == expected
    assert fits_sync(len(audio), filename="x.flac", language="en", prompt="p", limit=expected)
    assert not fits_sync(
        len(audio), filename="x.flac", language="en", prompt="p", limit=expected - 1
    )


def test_client_transcribe_refuses_too_much_before_sending(
    api: FakeSpeechApi, client: GpuqueueClient, tmp_path: Path
) -> None:
    client.sync_max_bytes = 1000
    with pytest.raises(ApiError) as too_big:
        client.transcribe(audio_file(tmp_path, "big.wav", 2000))
    assert (too_big.value.status, too_big.value.code) == (413, "PAYLOAD_TOO_LARGE")
    with pytest.raises(ApiError):
        client.transcribe_pcm(b"\x00" * 1002)
    with pytest.raises(ValueError, match="filename"):
        client.transcribe(b"RIFF")
    assert api.requests == []


def test_client_async_round_trip_streams_and_reports_progress(
    api: FakeSpeechApi, tmp_path: Path
) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"  # even a session-wide one
    client = GpuqueueClient(api.url, TOKEN, session=session, timeout=10)
    clip = audio_file(tmp_path, "long.ogg", 3_000_000)
    seen: list[tuple[int, int]] = []

    started = client.submit_speech(clip, language="en", progress=lambda *p: seen.append(p))

    assert started["status"] == "AWAITING_UPLOAD"
    (upload,) = api.uploads
    assert upload.body == clip.read_bytes()
    assert "Authorization" not in upload.headers
    assert len(seen) > 2  # chunk by chunk, not one read of the whole file
    assert seen[-1] == (3_000_000, 3_000_000)
    assert [sent for sent, _ in seen] == sorted(sent for sent, _ in seen)
    with pytest.raises(ApiError) as early:
        client.transcript(started["task_id"])
    assert early.value.status == 409
    task = client.wait(started["task_id"], timeout=10, poll_interval=0.01)
    assert task["status"] == "DONE"
    assert client.transcript(started["task_id"]) == TRANSCRIPT


def test_client_upload_sends_exactly_the_signed_length(
    api: FakeSpeechApi, client: GpuqueueClient
) -> None:
    started = client.start_async_transcription("a.wav", 10)
    url, headers = started["upload_url"], started["upload_headers"]
    assert headers == {"Content-Type": "audio/wav", **SSE}

    with pytest.raises(ValueError, match="ended after 4 of the 10 bytes"):
        client.upload(url, headers, io.BytesIO(b"RIFF"), size=10)
    with pytest.raises(ValueError, match="signed for 9 bytes, not 10"):
        client.upload(url, headers | {"Content-Length": "9"}, b"0123456789")
    with pytest.raises(ValueError, match="size is needed"):
        client.upload(url, headers, ChainedReader(io.BytesIO(b"0123456789")))
    assert api.uploads == []

    # A longer file: only the signed 10 bytes go.
    client.upload(url, headers | {"Content-Length": "10"}, io.BytesIO(b"0123456789abc"), size=10)
    assert api.uploads[0].body == b"0123456789"
    assert api.tasks[started["task_id"]].uploaded == b"0123456789"


def test_client_s3_errors_carry_s3s_code_and_message(
    api: FakeSpeechApi, client: GpuqueueClient
) -> None:
    started = client.start_async_transcription("a.wav", 4)

    with pytest.raises(ApiError) as refused:
        client.upload(started["upload_url"], {"Content-Type": "audio/wav"}, b"RIFF")

    assert (refused.value.status, refused.value.code) == (403, "SignatureDoesNotMatch")
    assert refused.value.message == "a signed header differs"


def test_wav_header_and_chained_reader_make_a_wav() -> None:
    pcm = bytes(range(256)) * 4
    reader = ChainedReader(
        io.BytesIO(wav_header(len(pcm), sample_rate=22050, channels=2)), io.BytesIO(pcm)
    )
    chunks = []
    while chunk := reader.read(100):
        assert len(chunk) <= 100
        chunks.append(chunk)

    with wave.open(io.BytesIO(b"".join(chunks))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (22050, 2, 2)
        assert wav.readframes(wav.getnframes()) == pcm
