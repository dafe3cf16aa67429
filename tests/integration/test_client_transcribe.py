"""`gpuqueue transcribe` with real speech: espeak-ng says it, the stand-in speech server
(PocketSphinx) hears it.

Between them sits a small fake of the API's speech routes that uses the server's own
pieces where it matters to the client: the layer's multipart parser (`parse_form`) reads
what the client encodes, `audio_format` judges the upload, `pcm_to_wav` wraps raw PCM, and
the presigned-PUT flow stores the bytes the client streams. So the words come back only if
the client's multipart body, PCM query, WAV wrapping and streamed upload are all right.

espeak-ng is a Debian package (tools/install_system_packages.sh installs it); without it
these tests fail on purpose, as tests/integration/test_speech_server.py explains.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
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
from gpuqueue.api.multipart_form import parse_form
from gpuqueue.errors import GpuqueueError, InvalidInput, UnsupportedMediaType
from gpuqueue.speech.audio import HEAD_BYTES, audio_format, pcm_to_wav
from gpuqueue_local.standins.speech_server import SpeechServer

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client import GpuqueueClient  # noqa: E402
from gpuqueue_client.cli import app  # noqa: E402

TOKEN = "tok-speech"
HELLO = "hello world"
TIMEOUT = 60.0  # a loaded 2-core machine decodes ~3x slower than an idle one
FAST_POLL = ["--poll-interval", "0.05", "--timeout", str(TIMEOUT)]


def error_reply(status: int, exc: GpuqueueError) -> Reply:
    body = {"error": exc.message, "code": exc.code} | ({"field": exc.field} if exc.field else {})
    return reply(status, body)


@dataclass
class Job:
    filename: str
    size_bytes: int
    content_type: str
    status: str = "AWAITING_UPLOAD"
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class SpeechApi:
    """The speech routes over the stand-in; async jobs run on a thread once uploaded."""

    speech_url: str
    url: str = ""
    s3_url: str = ""
    jobs: dict[str, Job] = field(default_factory=dict)
    workers: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def transcribe(self, audio: bytes, filename: str, language: str | None) -> dict[str, Any]:
        fmt = audio_format(filename, None, audio[:HEAD_BYTES])
        answer = requests.post(
            f"{self.speech_url}/v1/audio/transcriptions",
            files={"file": (f"audio{fmt.extension}", audio, fmt.content_type)},
            data={"response_format": "verbose_json", "model": "stand-in"}
            | ({"language": language} if language else {}),
            timeout=TIMEOUT,
        )
        answer.raise_for_status()
        body = answer.json()
        return {
            "code": 0,
            "language": body.get("language"),
            "language_probability": body.get("language_probability"),
            "duration": body.get("duration"),
            "text": body["text"],
            "segments": [
                {"start": s["start"], "end": s["end"], "text": s["text"]} for s in body["segments"]
            ],
        }

    def handle(self, request: Request) -> Reply:  # noqa: PLR0911 - one return per route
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return reply(401, {"message": "Unauthorized"})
        method, path = request.method, request.path
        try:
            if (method, path) == ("POST", "/api/v1/speech/transcribe"):
                form = parse_form(request.body, request.headers.get("Content-Type"))
                if "file" not in form:
                    raise InvalidInput("the field 'file' is required", field="file")
                language = form["language"].text if "language" in form else None
                part = form["file"]
                return reply(200, self.transcribe(part.data, part.filename or "", language))
            if (method, path) == ("POST", "/api/v1/speech/pcm"):
                wav = pcm_to_wav(
                    request.body,
                    sample_rate=int(request.query["sample_rate"][0]),
                    channels=int(request.query["channels"][0]),
                )
                language = request.query.get("language", [None])[0]
                return reply(200, self.transcribe(wav, "pcm.wav", language))
        except UnsupportedMediaType as exc:
            return error_reply(415, exc)
        except InvalidInput as exc:
            return error_reply(400, exc)
        if (method, path) == ("POST", "/api/v1/speech/async"):
            return self._start(json.loads(request.body))
        if method == "GET" and (match := re.fullmatch(r"/api/v1/tasks/([^/]+)", path)):
            with self.lock:
                job = self.jobs[match[1]]
                return reply(
                    200,
                    {
                        "task_id": match[1],
                        "kind": "speech",
                        "status": job.status,
                        "error": job.error,
                    },
                )
        if method == "GET" and (match := re.fullmatch(r"/api/v1/speech/transcripts/(.+)", path)):
            with self.lock:
                job = self.jobs[match[1]]
                if job.result is None:
                    return reply(409, {"error": f"task is {job.status}", "code": "CONFLICT"})
                return reply(200, job.result)
        return reply(404, {"error": "no such route", "code": "NOT_FOUND"})

    def _start(self, body: dict[str, Any]) -> Reply:
        task_id = str(uuid.uuid4())
        job = Job(body["filename"], body["size_bytes"], body["content_type"])
        with self.lock:
            self.jobs[task_id] = job
        return reply(
            202,
            {
                "task_id": task_id,
                "status": "AWAITING_UPLOAD",
                "upload_url": f"{self.s3_url}/audio/{task_id}?X-Amz-Signature=sig",
                "upload_method": "PUT",
                "upload_headers": {"Content-Type": job.content_type},
                "expires_in": 900,
                "message": "PUT the audio to upload_url",
            },
        )

    def handle_s3(self, request: Request) -> Reply:
        task_id = request.path.rsplit("/", 1)[-1]
        with self.lock:
            job = self.jobs[task_id]
            assert request.headers.get("Content-Type") == job.content_type
            assert request.headers.get("Content-Length") == str(job.size_bytes)
            assert "Authorization" not in request.headers
            job.status = "QUEUED"  # the S3 event
        worker = threading.Thread(target=self._run, args=(job, request.body), daemon=True)
        self.workers.append(worker)
        worker.start()
        return 200, {}, b""

    def _run(self, job: Job, audio: bytes) -> None:
        with self.lock:
            job.status = "RUNNING"
        try:
            result = self.transcribe(audio, job.filename, None)
        except Exception as exc:
            with self.lock:
                job.status, job.error = "FAILED", repr(exc)
            return
        with self.lock:
            job.status, job.result = "DONE", result


@pytest.fixture(scope="module")
def speech_server() -> Iterator[SpeechServer]:
    with SpeechServer() as server:  # one model load for the module
        yield server


@pytest.fixture
def api(speech_server: SpeechServer) -> Iterator[SpeechApi]:
    fake = SpeechApi(speech_url=speech_server.url)
    with serve(fake.handle_s3) as s3_url, serve(fake.handle) as url:
        fake.url, fake.s3_url = url, s3_url
        yield fake
        for worker in fake.workers:
            worker.join(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def hello_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail(
            "espeak-ng is not installed: run tools/install_system_packages.sh "
            "(the speech tests need it to make real speech; CI installs it)"
        )
    path = tmp_path_factory.mktemp("speech") / "hello.wav"
    # American English: PocketSphinx's en-us model hears espeak's British voice badly.
    subprocess.run([espeak, "-v", "en-us", "-w", str(path), HELLO], check=True)
    return path


@pytest.fixture
def hello_pcm(hello_wav: Path, tmp_path: Path) -> tuple[Path, int]:
    """The same speech as raw 16-bit PCM, and its sample rate."""
    with wave.open(str(hello_wav)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
    path = tmp_path / "hello.pcm"
    path.write_bytes(frames)
    return path, rate


@pytest.fixture
def cli(api: SpeechApi, tmp_path: Path) -> Callable[..., Result]:
    runner = CliRunner()
    env = {
        "GPUQUEUE_API_URL": api.url,
        "GPUQUEUE_TOKEN": TOKEN,
        "GPUQUEUE_CONFIG_DIR": str(tmp_path / "config"),
        "COLUMNS": "160",
        "NO_COLOR": "1",
    }
    return lambda *args: runner.invoke(app, ["transcribe", *args], env=env)


def test_a_wav_comes_back_as_its_words(cli: Callable[..., Result], hello_wav: Path) -> None:
    result = cli(str(hello_wav), "--language", "en")

    assert result.exit_code == 0, result.output
    assert HELLO in result.stdout.lower()
    assert "language: en" in result.stderr


def test_raw_pcm_comes_back_as_its_words(
    cli: Callable[..., Result], hello_pcm: tuple[Path, int]
) -> None:
    path, rate = hello_pcm

    result = cli("--pcm", str(path), "--sample-rate", str(rate), "--json")

    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert HELLO in body["text"].lower()
    assert body["duration"] == pytest.approx(path.stat().st_size / 2 / rate, abs=0.05)


def test_the_async_upload_comes_back_as_its_words(
    cli: Callable[..., Result], hello_wav: Path
) -> None:
    result = cli(str(hello_wav), "--async", *FAST_POLL)

    assert result.exit_code == 0, result.output
    assert HELLO in result.stdout.lower()
    assert "upload: 100%" in result.stderr


def test_long_raw_pcm_is_uploaded_as_a_wav_the_decoder_reads(
    cli: Callable[..., Result],
    hello_pcm: tuple[Path, int],
    api: SpeechApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, rate = hello_pcm
    monkeypatch.setattr(GpuqueueClient, "sync_max_bytes", path.stat().st_size - 1)

    result = cli("--pcm", str(path), "--sample-rate", str(rate), *FAST_POLL)

    assert result.exit_code == 0, result.output
    assert HELLO in result.stdout.lower()
    (job,) = api.jobs.values()
    assert (job.filename, job.content_type) == ("hello.wav", "audio/wav")
    assert job.size_bytes == path.stat().st_size + 44


def test_what_is_not_audio_is_refused_by_the_servers_own_check(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    fake = tmp_path / "photo.wav"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))

    result = cli(str(fake))

    assert result.exit_code == 1
    assert result.stderr.strip() == "error: file is a PNG image, not audio (field: file)"
