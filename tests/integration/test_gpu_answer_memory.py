"""A GPU answer is read into a bounded share of the dispatcher's memory, over real HTTP.

The dispatcher runs several calls at once in one small function, so each answer reserves
room (memory_budget.py) as it arrives, by its Content-Length (asked for uncompressed), is
refused when no server should send that much or when it could never fit, and keeps only
its PNG's bytes until stored. Speech audio goes out streamed with its Content-Length.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpuqueue.dispatch.jobs import ImageJob
from gpuqueue.errors import GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.gpu.image_client import IMAGE_ANSWER_IN_MEMORY, image_answer_limit, image_generators
from gpuqueue.gpu.memory_budget import MemoryBudget
from gpuqueue.gpu.speech_client import AudioStream, OpenAITranscriptionClient
from gpuqueue.models import Endpoint, EndpointProtocol, ImageParams, Task, TaskKind, TaskStatus
from gpuqueue.store.image_store import ImageStore

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 3000
DEADLINE = 10.0


@dataclass
class Script:
    body: bytes = b""
    content_length: bool = True
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            script.requests.append((dict(self.headers), self.rfile.read(length)))
            # The client may stop reading (an answer it refused).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._answer()

        def _answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if script.content_length:
                self.send_header("Content-Length", str(len(script.body)))
                self.end_headers()
                self.wfile.write(script.body)
            else:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for at in range(0, len(script.body), 1 << 16):
                    piece = script.body[at : at + (1 << 16)]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()
    httpd.server_close()


def a1111(png: bytes = PNG) -> bytes:
    return json.dumps({"images": [base64.b64encode(png).decode()], "info": "{}"}).encode()


def task(side: int = 64) -> Task:
    return Task(
        task_id="t-1",
        user_id="u-1",
        status=TaskStatus.RUNNING,
        prompt="a lighthouse",
        params=ImageParams(width=side, height=side, steps=4),
        created_at="2026-12-07T00:00:00.000000Z",
        updated_at="2026-12-07T00:00:00.000000Z",
    )


def endpoint(url: str, kind: TaskKind = TaskKind.IMAGE) -> Endpoint:
    return Endpoint(endpoint_id="gpu", url=url, kind=kind, protocol=EndpointProtocol.A1111)


class Bucket:
    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.used_while_storing: list[int] = []

    def put_png(self, task_id: str, png: bytes) -> str:
        self.used_while_storing.append(self.budget.used)
        return f"results/{task_id}.png"


def test_an_answer_reserves_its_size_while_decoded_and_its_png_until_stored(server) -> None:  # type: ignore[no-untyped-def]
    url, script = server
    script.body = a1111()
    budget = MemoryBudget(10 * 1024 * 1024)
    seen: list[int] = []
    generators = image_generators()
    a1111_client = generators[EndpointProtocol.A1111]

    class Watching:
        def generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            png = a1111_client.generate(*args, **kwargs)
            seen.append(kwargs["hold"].held)
            return png

    bucket = Bucket(budget)
    job = ImageJob({EndpointProtocol.A1111: Watching()}, bucket, memory=budget)  # type: ignore[dict-item,arg-type]
    output = job.run(endpoint(url), task(), None, timeout_seconds=DEADLINE)

    assert output.png == PNG
    assert seen == [len(PNG)]  # the answer's 3x given back once decoded, the PNG kept
    assert budget.used == len(PNG)
    job.store(task(), output)
    assert bucket.used_while_storing == [len(PNG)]
    assert budget.used == 0
    # Asked uncompressed, so the Content-Length tells the size before the body is read.
    [(headers, _)] = script.requests
    assert headers["Accept-Encoding"] == "identity"


def test_a_failed_call_gives_its_reservation_back(server) -> None:  # type: ignore[no-untyped-def]
    url, script = server
    script.body = b'{"images": ["not base64!"]}'
    budget = MemoryBudget(10 * 1024 * 1024)
    job = ImageJob(image_generators(), ImageStore(None, "b"), memory=budget)  # type: ignore[arg-type]

    with pytest.raises(PermanentGpuError, match="unreadable"):
        job.run(endpoint(url), task(), None, timeout_seconds=DEADLINE)
    assert budget.used == 0


@pytest.mark.parametrize("content_length", [True, False], ids=["announced", "chunked"])
def test_an_answer_larger_than_any_png_of_its_size_is_refused(server, content_length) -> None:  # type: ignore[no-untyped-def]
    url, script = server
    script.content_length = content_length
    limit = image_answer_limit(task().params)
    script.body = a1111(b"\x89PNG\r\n\x1a\n" + b"\x00" * limit)
    budget = MemoryBudget(100 * limit)

    with pytest.raises(RetryableGpuError, match="sent an answer of"):
        image_generators()[EndpointProtocol.A1111].generate(
            endpoint(url), task(), timeout_seconds=DEADLINE, hold=budget.hold()
        )
    assert budget.used == 0


def test_an_answer_that_could_never_fit_the_budget_fails_saying_so(server) -> None:  # type: ignore[no-untyped-def]
    url, script = server
    script.body = a1111()
    budget = MemoryBudget(len(script.body))  # less than its 3x

    with pytest.raises(PermanentGpuError, match="MemorySize"):
        image_generators()[EndpointProtocol.A1111].generate(
            endpoint(url), task(), timeout_seconds=DEADLINE, hold=budget.hold()
        )
    assert budget.used == 0


def test_an_unannounced_answer_runs_alone_within_what_the_budget_holds(server) -> None:  # type: ignore[no-untyped-def]
    url, script = server
    script.content_length = False
    script.body = a1111()
    side = 1024  # its limit's 3x is more than the budget below: the whole budget is taken
    assert image_answer_limit(task(side).params) * IMAGE_ANSWER_IN_MEMORY > 2_000_000
    budget = MemoryBudget(2_000_000)
    hold = budget.hold()

    png = image_generators()[EndpointProtocol.A1111].generate(
        endpoint(url), task(side), timeout_seconds=DEADLINE, hold=hold
    )

    assert png == PNG
    assert hold.held == len(PNG)


def test_a_call_that_finds_no_memory_free_within_its_time_times_out(server) -> None:  # type: ignore[no-untyped-def]
    url, script = server
    script.body = a1111()
    budget = MemoryBudget(4 * len(script.body))
    other = budget.hold()
    other.reserve(2 * len(script.body), within=0)  # another call's answer, being stored

    with pytest.raises(GpuTimeout, match="timed out"):
        image_generators()[EndpointProtocol.A1111].generate(
            endpoint(url), task(), timeout_seconds=0.5, hold=budget.hold()
        )
    assert budget.used == 2 * len(script.body)


def test_speech_audio_is_streamed_with_its_length_and_the_answer_given_back(server) -> None:  # type: ignore[no-untyped-def]
    url, script = server
    script.body = json.dumps({"text": " hello ", "language": "english"}).encode()
    audio = b"RIFF" + bytes(range(256)) * 1000
    budget = MemoryBudget(10 * 1024 * 1024)

    transcript = OpenAITranscriptionClient().transcribe(
        endpoint(url, TaskKind.SPEECH),
        AudioStream(size=len(audio), reader=io.BytesIO(audio)),
        filename='a "b".wav',
        content_type="audio/wav",
        language="en",
        prompt=None,
        timeout_seconds=DEADLINE,
        hold=budget.hold(),
    )

    assert (transcript.text, transcript.language) == ("hello", "en")
    assert budget.used == 0
    [(headers, body)] = script.requests
    assert "Transfer-Encoding" not in headers  # a Content-Length, as every server accepts
    assert int(headers["Content-Length"]) == len(body)
    boundary = headers["Content-Type"].split("boundary=")[1]
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert audio in body
    assert b'name="model"\r\n\r\nwhisper-1\r\n' in body
    assert b'name="language"\r\n\r\nen\r\n' in body
    assert b'name="file"; filename="a %22b%22.wav"\r\nContent-Type: audio/wav\r\n\r\n' in body


def test_audio_that_ends_short_of_its_length_fails_the_call_to_be_retried(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server

    with pytest.raises(RetryableGpuError):
        OpenAITranscriptionClient().transcribe(
            endpoint(url, TaskKind.SPEECH),
            AudioStream(size=10_000, reader=io.BytesIO(b"RIFF" * 10)),
            filename="a.wav",
            content_type="audio/wav",
            language=None,
            prompt=None,
            timeout_seconds=DEADLINE,
        )
