"""The speech adapter against a tiny local HTTP server: what it sends, how it reads answers."""

from __future__ import annotations

import email.parser
import email.policy
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
import requests

from gpuqueue.errors import GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.speech_client import (
    OpenAITranscriptionClient,
    Transcript,
    TranscriptSegment,
)
from gpuqueue.models import Endpoint, TaskKind

AUDIO = b"RIFF\x00\x00\x00\x00WAVE" + bytes(range(256)) * 4 + b"\r\n--boundary\r\n"

OPENAI_VERBOSE = {
    "task": "transcribe",
    "language": "english",
    "duration": 2.5,
    "text": " Hello world. How are you?",
    "segments": [
        {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": 1.2,
            "text": " Hello world.",
            "tokens": [50364, 2425],
            "temperature": 0.0,
            "avg_logprob": -0.2,
            "compression_ratio": 0.8,
            "no_speech_prob": 0.01,
        },
        {"id": 1, "start": 1.2, "end": 2.5, "text": " How are you?"},
    ],
}


@dataclass
class Captured:
    path: str
    fields: dict[str, str]
    filename: str | None
    file_content_type: str | None
    file: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = json.dumps(OPENAI_VERBOSE).encode()
    content_type: str = "application/json"


@dataclass
class FakeSpeechEndpoint:
    """Records each request; answers with `reply`, after `release` is set when `hold` is."""

    reply: Reply = field(default_factory=Reply)
    hold: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[Captured] = field(default_factory=list)


def _capture(path: str, content_type: str, body: bytes) -> Captured:
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, str] = {}
    filename = file_type = None
    file = b""
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if name == "file":
            filename, file_type, file = part.get_filename(), part.get_content_type(), payload
        else:
            fields[str(name)] = payload.decode()
    return Captured(path, fields, filename, file_type, file)


def _handler(state: FakeSpeechEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(_capture(self.path, self.headers["Content-Type"], body))
            if state.hold:
                state.release.wait(10)  # bounded: the test releases it on teardown
            reply = state.reply
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            except OSError:
                pass  # the client gave up (timeout test)

    return Handler


@pytest.fixture
def fake() -> Iterator[tuple[FakeSpeechEndpoint, Endpoint]]:
    state = FakeSpeechEndpoint()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    port = server.server_address[1]
    endpoint = Endpoint(
        endpoint_id="speech-a", url=f"http://127.0.0.1:{port}/", kind=TaskKind.SPEECH
    )
    try:
        yield state, endpoint
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def transcribe(
    endpoint: Endpoint,
    *,
    language: str | None = "en",
    prompt: str | None = None,
    timeout: float = 5.0,
    client: OpenAITranscriptionClient | None = None,
) -> Transcript:
    return (client or OpenAITranscriptionClient()).transcribe(
        endpoint,
        AUDIO,
        filename="clip.wav",
        content_type="audio/wav",
        language=language,
        prompt=prompt,
        timeout_seconds=timeout,
    )


def json_reply(body: dict[str, Any] | list[Any], status: int = 200) -> Reply:
    return Reply(status=status, body=json.dumps(body).encode())


# --------------------------------------------------------------------------- the request


def test_sends_openai_multipart_with_verbose_json(fake: tuple[FakeSpeechEndpoint, Endpoint]):
    state, endpoint = fake
    transcribe(endpoint, language="en", prompt="names: Ada, Linus")
    (sent,) = state.requests
    assert sent.path == "/v1/audio/transcriptions"
    assert sent.fields == {
        "model": "whisper-1",
        "response_format": "verbose_json",
        "language": "en",
        "prompt": "names: Ada, Linus",
    }
    assert sent.filename == "clip.wav"
    assert sent.file_content_type == "audio/wav"
    assert sent.file == AUDIO  # binary intact, CRLF and boundary-like bytes included


def test_optional_fields_are_left_out_and_the_model_is_configurable(
    fake: tuple[FakeSpeechEndpoint, Endpoint],
):
    state, endpoint = fake
    client = OpenAITranscriptionClient(model="Systran/faster-whisper-small")
    transcribe(endpoint, language=None, prompt=None, client=client)
    assert state.requests[0].fields == {
        "model": "Systran/faster-whisper-small",
        "response_format": "verbose_json",
    }


# --------------------------------------------------------------------------- the answer


def test_reads_openai_verbose_json(fake: tuple[FakeSpeechEndpoint, Endpoint]):
    _, endpoint = fake
    transcript = transcribe(endpoint)
    assert transcript == Transcript(
        language="en",  # OpenAI names the language; we give the code
        language_probability=None,
        duration=2.5,
        text="Hello world. How are you?",
        segments=[
            TranscriptSegment(start=0.0, end=1.2, text="Hello world."),
            TranscriptSegment(start=1.2, end=2.5, text="How are you?"),
        ],
    )


def test_reads_faster_whisper_language_probability(fake: tuple[FakeSpeechEndpoint, Endpoint]):
    state, endpoint = fake
    state.reply = json_reply(
        {**OPENAI_VERBOSE, "language": "de", "language_probability": 0.97, "text": "Hallo Welt"}
    )
    transcript = transcribe(endpoint)
    assert (transcript.language, transcript.language_probability) == ("de", 0.97)
    assert transcript.text == "Hallo Welt"


def test_reads_whisper_cpp_detected_language_probability(
    fake: tuple[FakeSpeechEndpoint, Endpoint],
):
    state, endpoint = fake
    state.reply = json_reply(
        {
            "task": "transcribe",
            "language": "Haitian Creole",
            "duration": 1.0,
            "text": "bonjou",
            "segments": [],
            "detected_language": "haitian creole",
            "detected_language_probability": 0.61,
        }
    )
    transcript = transcribe(endpoint)
    assert (transcript.language, transcript.language_probability) == ("ht", 0.61)


@pytest.mark.parametrize(
    "body",
    [
        {"text": "hello world"},  # response_format=json only
        {"text": "hello world", "segments": None, "language": None, "duration": None},
    ],
)
def test_tolerates_servers_that_omit_the_details(
    fake: tuple[FakeSpeechEndpoint, Endpoint], body: dict[str, Any]
):
    state, endpoint = fake
    state.reply = json_reply(body)
    assert transcribe(endpoint) == Transcript(text="hello world")


def test_unknown_language_names_are_kept(fake: tuple[FakeSpeechEndpoint, Endpoint]):
    state, endpoint = fake
    state.reply = json_reply({"text": "x", "language": "Klingon"})
    assert transcribe(endpoint).language == "klingon"


@pytest.mark.parametrize(
    "reply",
    [
        Reply(body=b"hello world", content_type="text/plain"),
        Reply(body=b"<html>gateway</html>", content_type="text/html"),
        json_reply({"segments": []}),  # no text
        json_reply(["hello"]),
        json_reply({"text": "x", "segments": [{"start": "soon", "end": 1, "text": "x"}]}),
    ],
)
def test_an_unreadable_answer_is_permanent(fake: tuple[FakeSpeechEndpoint, Endpoint], reply: Reply):
    state, endpoint = fake
    state.reply = reply
    with pytest.raises(PermanentGpuError, match="unreadable transcription"):
        transcribe(endpoint)


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_5xx_and_busy_answers_are_retryable_not_timeouts(
    fake: tuple[FakeSpeechEndpoint, Endpoint], status: int
):
    state, endpoint = fake
    state.reply = json_reply({"error": {"message": "CUDA out of memory"}}, status=status)
    with pytest.raises(RetryableGpuError) as raised:
        transcribe(endpoint)
    assert not isinstance(raised.value, GpuTimeout)
    assert f"HTTP {status}" in str(raised.value)
    assert "CUDA out of memory" in str(raised.value)


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (400, b'{"error": {"message": "Invalid file format."}}', "Invalid file format."),
        (413, b'{"detail": "file too large"}', "file too large"),
        (415, b"unsupported media", "unsupported media"),
        (404, b"", "HTTP 404"),
    ],
)
def test_4xx_is_permanent_and_says_why(
    fake: tuple[FakeSpeechEndpoint, Endpoint], status: int, body: bytes, detail: str
):
    state, endpoint = fake
    state.reply = Reply(status=status, body=body)
    with pytest.raises(PermanentGpuError) as raised:
        transcribe(endpoint)
    assert not isinstance(raised.value, RetryableGpuError)
    assert f"HTTP {status}" in str(raised.value)
    assert detail in str(raised.value)


def test_a_slow_answer_is_a_timeout(fake: tuple[FakeSpeechEndpoint, Endpoint]):
    state, endpoint = fake
    state.hold = True
    with pytest.raises(GpuTimeout, match=r"speech-a timed out after 0\.3s") as raised:
        transcribe(endpoint, timeout=0.3)
    assert isinstance(raised.value, RetryableGpuError)
    assert len(state.requests) == 1  # the server had the audio: it was slow, not unreachable


def test_a_refused_connection_is_retryable_not_a_timeout():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there any more: the connect is refused.
    endpoint = Endpoint(endpoint_id="gone", url=f"http://127.0.0.1:{port}", kind=TaskKind.SPEECH)
    with pytest.raises(RetryableGpuError, match="gone unreachable") as raised:
        transcribe(endpoint)
    assert not isinstance(raised.value, GpuTimeout)


class RaisingSession:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        raise self.error


@pytest.mark.parametrize(
    ("error", "is_timeout"),
    [
        (requests.ConnectTimeout("connect timed out"), False),  # never reached the server
        (requests.ReadTimeout("read timed out"), True),
        (requests.exceptions.ChunkedEncodingError("cut"), False),
        (requests.exceptions.InvalidURL("bad"), False),
    ],
)
def test_request_errors_are_classified(error: Exception, is_timeout: bool):
    session = cast(requests.Session, RaisingSession(error))
    endpoint = Endpoint(endpoint_id="s", url="http://s:1", kind=TaskKind.SPEECH)
    with pytest.raises(RetryableGpuError) as raised:
        transcribe(endpoint, client=OpenAITranscriptionClient(session))
    assert isinstance(raised.value, GpuTimeout) is is_timeout
