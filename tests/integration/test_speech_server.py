"""The stand-in speech server, over real HTTP: it must really transcribe espeak-ng speech.

espeak-ng is a Debian package (tools/install_system_packages.sh installs it). Without it
these tests fail, on purpose: skipping would hide that speech was never tested.
The voice is espeak-ng's American English (``-v en-us``), matching PocketSphinx's en-us
model; its default British voice comes out as "the lem will" for "hello world".
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import soundfile

from gpuqueue.errors import PermanentGpuError
from gpuqueue.gpu.speech_client import OpenAITranscriptionClient
from gpuqueue.models import Endpoint, TaskKind
from gpuqueue.speech.audio import pcm_to_wav, wav_duration_seconds
from gpuqueue_local.standins.speech_server import SpeechServer, SpeechServerKnobs
from gpuqueue_testing import speak_wav, wait_for

TRANSCRIBE = "/v1/audio/transcriptions"
TIMEOUT = 60.0  # a loaded 2-core CI machine decodes ~3x slower than an idle one
LOCAL_DIR = Path(__file__).resolve().parents[2] / "local"
HELLO = "hello world"
FOX = "the quick brown fox jumps over the lazy dog"

Speak = Callable[[str], bytes]


@pytest.fixture(scope="module")
def speak() -> Speak:
    """Text -> WAV bytes spoken by espeak-ng (cached per text)."""
    return speak_wav


@pytest.fixture(scope="module")
def module_server() -> Iterator[SpeechServer]:
    with SpeechServer() as server:  # one model load for the module
        yield server


@pytest.fixture
def server(module_server: SpeechServer) -> Iterator[SpeechServer]:
    module_server.set_knobs(dataclasses.asdict(SpeechServerKnobs()))
    module_server.reset_stats()
    yield module_server
    module_server.set_knobs(dataclasses.asdict(SpeechServerKnobs()))  # also releases a hang


def post_audio(
    server: SpeechServer,
    audio: bytes,
    *,
    filename: str = "clip.wav",
    content_type: str = "audio/wav",
    **fields: str,
) -> requests.Response:
    fields.setdefault("response_format", "verbose_json")
    return requests.post(
        server.url + TRANSCRIBE,
        files={"file": (filename, audio, content_type)},
        data={"model": "whisper-1", **fields},
        timeout=TIMEOUT,
    )


def words(text: str) -> set[str]:
    return set(text.lower().split())


def assert_heard_hello_world(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert {"hello", "world"} <= words(body["text"]), body["text"]
    return body


def samples_of(wav_bytes: bytes) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        return wav.readframes(wav.getnframes()), wav.getframerate()


# --------------------------------------------------------------------------- transcription


def test_espeak_writes_22050_hz_mono_16_bit(speak: Speak):
    with wave.open(io.BytesIO(speak(HELLO))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (22_050, 1, 2)


def test_hello_world_wav_is_transcribed_as_verbose_json(server: SpeechServer, speak: Speak):
    audio = speak(HELLO)
    body = assert_heard_hello_world(post_audio(server, audio))
    assert body["task"] == "transcribe"
    assert (body["language"], body["language_probability"]) == ("en", 1.0)
    assert body["duration"] == pytest.approx(wav_duration_seconds(audio), abs=0.01)
    assert body["segments"], body
    for index, segment in enumerate(body["segments"]):
        assert segment["id"] == index
        assert 0 <= segment["start"] < segment["end"] <= body["duration"]
    assert " ".join(s["text"] for s in body["segments"]) == body["text"]


def test_a_longer_sentence_is_mostly_right(server: SpeechServer, speak: Speak):
    # PocketSphinx on synthetic speech gets 80-90% of words here ("jumps" -> "jumped");
    # half is a margin for small numeric differences across machines, and far above the
    # ~2 words ("the") a wrong transcript shares with the sentence.
    response = post_audio(server, speak(FOX))
    assert response.status_code == 200, response.text
    reference = FOX.split()
    heard = words(response.json()["text"])
    assert sum(word in heard for word in reference) >= len(reference) / 2, heard


def test_raw_pcm_wrapped_by_pcm_to_wav_is_transcribed(server: SpeechServer, speak: Speak):
    pcm, rate = samples_of(speak(HELLO))
    wav = pcm_to_wav(pcm, sample_rate=rate, channels=1)
    assert_heard_hello_world(post_audio(server, wav))


def test_stereo_pcm_is_mixed_down(server: SpeechServer, speak: Speak):
    pcm, rate = samples_of(speak(HELLO))
    mono = np.frombuffer(pcm, dtype="<i2")
    stereo = np.column_stack([mono, mono]).astype("<i2").tobytes()
    assert_heard_hello_world(post_audio(server, pcm_to_wav(stereo, sample_rate=rate, channels=2)))


def test_16_khz_pcm_needs_no_resampling(server: SpeechServer, speak: Speak):
    _, rate = samples_of(speak(HELLO))
    data, _ = soundfile.read(io.BytesIO(speak(HELLO)), dtype="float64")
    positions = np.arange(round(len(data) * 16_000 / rate)) * (rate / 16_000)
    resampled = np.interp(positions, np.arange(len(data)), data)  # crude, on purpose
    pcm16 = (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()
    assert_heard_hello_world(post_audio(server, pcm_to_wav(pcm16, sample_rate=16_000, channels=1)))


@pytest.mark.parametrize(
    "encoding",
    [
        ("FLAC", None, 22_050, "audio/flac"),
        ("OGG", "VORBIS", 22_050, "audio/ogg"),
        ("OGG", "OPUS", 48_000, "audio/ogg"),
        ("MP3", "MPEG_LAYER_III", 22_050, "audio/mpeg"),
    ],
    ids=["flac", "ogg-vorbis", "ogg-opus", "mp3"],
)
def test_compressed_formats_are_transcribed(
    server: SpeechServer, speak: Speak, encoding: tuple[str, str | None, int, str]
):
    fmt, subtype, rate, content_type = encoding
    data, source_rate = soundfile.read(io.BytesIO(speak(HELLO)), dtype="float64")
    if rate != source_rate:  # Opus only takes 8/12/16/24/48 kHz
        positions = np.arange(round(len(data) * rate / source_rate)) * (source_rate / rate)
        data = np.interp(positions, np.arange(len(data)), data)
    buffer = io.BytesIO()
    soundfile.write(buffer, data, rate, format=fmt, subtype=subtype)
    response = post_audio(
        server, buffer.getvalue(), filename=f"clip.{fmt.lower()}", content_type=content_type
    )
    assert_heard_hello_world(response)


def test_the_adapter_reads_the_stand_in(server: SpeechServer, speak: Speak):
    endpoint = Endpoint(endpoint_id="standin", url=server.url, kind=TaskKind.SPEECH)
    transcript = OpenAITranscriptionClient().transcribe(
        endpoint,
        speak(HELLO),
        filename="hello.wav",
        content_type="audio/wav",
        language="en",
        prompt="a greeting",
        timeout_seconds=TIMEOUT,
    )
    assert {"hello", "world"} <= words(transcript.text)
    assert transcript.language == "en"
    assert transcript.language_probability == 1.0
    assert transcript.segments
    assert transcript.duration is not None
    assert transcript.duration > 0.5


def test_the_adapter_sees_a_4xx_as_permanent(server: SpeechServer):
    endpoint = Endpoint(endpoint_id="standin", url=server.url, kind=TaskKind.SPEECH)
    with pytest.raises(PermanentGpuError, match="could not decode the audio"):
        OpenAITranscriptionClient().transcribe(
            endpoint,
            b"definitely not audio",
            filename="x.wav",
            content_type="audio/wav",
            language=None,
            prompt=None,
            timeout_seconds=TIMEOUT,
        )


def test_silence_gives_an_empty_transcript(server: SpeechServer):
    wav = pcm_to_wav(b"\x00\x00" * 16_000, sample_rate=16_000, channels=1)
    response = post_audio(server, wav)
    assert response.status_code == 200
    body = response.json()
    assert (body["text"], body["segments"], body["duration"]) == ("", [], 1.0)


# --------------------------------------------------------------------------- other formats


def test_json_and_text_response_formats(server: SpeechServer, speak: Speak):
    as_json = post_audio(server, speak(HELLO), response_format="json")
    assert as_json.status_code == 200
    assert list(as_json.json()) == ["text"]
    assert {"hello", "world"} <= words(as_json.json()["text"])
    as_text = post_audio(server, speak(HELLO), response_format="text")
    assert as_text.status_code == 200
    assert as_text.headers["Content-Type"].startswith("text/plain")
    assert {"hello", "world"} <= words(as_text.text)


def test_response_format_defaults_to_json(server: SpeechServer, speak: Speak):
    response = requests.post(
        server.url + TRANSCRIBE,
        files={"file": ("a.wav", speak(HELLO), "audio/wav")},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert list(response.json()) == ["text"]


# --------------------------------------------------------------------------- bad input


def assert_openai_error(response: requests.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"]


@pytest.mark.parametrize(
    ("audio", "fragment"),
    [
        (b"", "empty"),
        (b"this is not audio at all", "could not decode"),
        (b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk", "could not decode"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81" + b"\x00" * 64, "webm audio is unsupported by"),
        (b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 64, "m4a/mp4 audio is unsupported by"),
    ],
)
def test_unreadable_audio_is_a_400(server: SpeechServer, audio: bytes, fragment: str):
    assert_openai_error(post_audio(server, audio), 400, fragment)


def test_other_languages_are_refused(server: SpeechServer, speak: Speak):
    assert_openai_error(post_audio(server, speak(HELLO), language="de"), 400, "English only")
    assert_heard_hello_world(post_audio(server, speak(HELLO), language="en"))


@pytest.mark.parametrize("response_format", ["srt", "vtt", "xml"])
def test_unsupported_response_formats_are_a_400(
    server: SpeechServer, speak: Speak, response_format: str
):
    response = post_audio(server, speak(HELLO), response_format=response_format)
    assert_openai_error(response, 400, "response_format")


def test_requests_without_the_file_field_or_multipart_are_a_400(server: SpeechServer):
    no_file = requests.post(server.url + TRANSCRIBE, files={"model": (None, "x")}, timeout=10)
    assert_openai_error(no_file, 400, "'file'")
    as_json = requests.post(server.url + TRANSCRIBE, json={"file": "x"}, timeout=10)
    assert_openai_error(as_json, 400, "multipart/form-data")
    assert server.stats()["calls"] == 2  # bad requests still count as calls


# --------------------------------------------------------------------------- routes and knobs


def test_models_health_and_stats(server: SpeechServer, speak: Speak):
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["whisper-1"]
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"

    assert_heard_hello_world(post_audio(server, speak(HELLO)))
    stats = requests.get(server.url + "/stats", timeout=10).json()
    assert (stats["calls"], stats["in_flight"], stats["max_in_flight"]) == (1, 0, 1)
    assert stats["audio_seconds"] > 0.5
    assert "hello" in stats["texts"][-1]

    reset = requests.post(server.url + "/reset-stats", timeout=10).json()
    assert (reset["calls"], reset["texts"]) == (0, [])


def test_unhealthy_knob_fails_the_health_check(server: SpeechServer):
    response = requests.post(server.url + "/knobs", json={"healthy": False}, timeout=10)
    assert response.json()["healthy"] is False
    assert requests.get(server.url + "/health", timeout=10).status_code == 503


@pytest.mark.parametrize("status", [500, 503])
def test_injected_failures(server: SpeechServer, speak: Speak, status: int):
    knobs = {"failure_rate": 1.0, "fail_status": status}
    assert requests.post(server.url + "/knobs", json=knobs, timeout=10).status_code == 200
    assert_openai_error(post_audio(server, speak(HELLO)), status, "injected failure")
    server.set_knobs({"failure_rate": 0.0})
    assert_heard_hello_world(post_audio(server, speak(HELLO)))


@pytest.mark.parametrize(
    "knobs",
    [{"failure_rate": 2}, {"capacity": -1}, {"hang": "yes"}, {"volume": 11}, {"latency_s": True}],
)
def test_invalid_knobs_are_refused(server: SpeechServer, knobs: dict[str, Any]):
    response = requests.post(server.url + "/knobs", json=knobs, timeout=10)
    assert response.status_code == 400
    assert server.knobs == SpeechServerKnobs()


def test_capacity_answers_429_beyond_the_limit(server: SpeechServer, speak: Speak):
    server.set_knobs({"capacity": 1, "hang": True})
    first: dict[str, requests.Response] = {}
    thread = threading.Thread(
        target=lambda: first.setdefault("response", post_audio(server, speak(HELLO))),
        daemon=True,
    )
    thread.start()
    wait_for(lambda: server.stats()["in_flight"] == 1, timeout=10, what="first call admitted")

    assert_openai_error(post_audio(server, speak(HELLO)), 429, "busy")

    server.set_knobs({"hang": False})  # the held call now runs and answers
    thread.join(TIMEOUT)
    assert_heard_hello_world(first["response"])
    assert server.stats()["max_in_flight"] == 1


def test_latency_knob_delays_the_answer(server: SpeechServer, speak: Speak):
    server.set_knobs({"latency_s": 0.5})
    response = post_audio(server, speak(HELLO))
    assert response.status_code == 200
    assert response.elapsed.total_seconds() >= 0.5


def test_shutdown_route_stops_the_server(speak: Speak):
    server = SpeechServer()
    server.start()
    try:
        response = requests.post(server.url + "/shutdown", timeout=10)
        assert response.json() == {"status": "stopping"}
        wait_for(lambda: server.stopped, timeout=10, what="server stopped")
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_runs_as_a_module_and_exits_on_shutdown(speak: Speak):
    process = subprocess.Popen(
        [sys.executable, "-m", "gpuqueue_local.standins.speech_server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(LOCAL_DIR)},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the server prints its URL
        assert line.startswith("speech-server listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        response = requests.post(
            url + TRANSCRIBE,
            files={"file": ("hello.wav", speak(HELLO), "audio/wav")},
            data={"response_format": "verbose_json"},
            timeout=TIMEOUT,
        )
        assert_heard_hello_world(response)
        assert requests.post(url + "/shutdown", timeout=10).status_code == 200
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_credential_knob_refuses_transcriptions_models_and_health_without_the_key(
    server: SpeechServer, speak: Speak
):
    key = "whisper-key-9e2"
    server.set_knobs({"auth_token": key})

    refused = post_audio(server, speak(HELLO))
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    for path in ("/health", "/v1/models"):
        assert requests.get(server.url + path, timeout=10).status_code == 401
    right = {"Authorization": f"Bearer {key}"}
    assert requests.get(server.url + "/health", headers=right, timeout=10).status_code == 200
    heard = requests.post(
        server.url + TRANSCRIBE,
        files={"file": ("hello.wav", speak(HELLO), "audio/wav")},
        data={"response_format": "verbose_json"},
        headers=right,
        timeout=TIMEOUT,
    )
    assert_heard_hello_world(heard)
    assert (server.stats()["calls"], server.stats()["refused"]) == (1, 3)
    assert key not in requests.get(server.url + "/knobs", timeout=10).text


def test_knobs_round_trip_as_json(server: SpeechServer):
    server.set_knobs({"latency_s": 0.25, "capacity": 3})
    knobs = json.loads(requests.get(server.url + "/knobs", timeout=10).text)
    assert (knobs["latency_s"], knobs["capacity"]) == (0.25, 3)
