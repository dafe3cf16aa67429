"""Speech-to-text on the local stack over HTTP: real speech (espeak-ng) in, words out,
through the pocketsphinx stand-in the stack registers; long audio through S3 and the queue."""

from __future__ import annotations

import io
import uuid
import wave
from collections.abc import Iterator

import pytest
import requests

from gpuqueue_testing import speak_wav, wait_for

from .conftest import ApiUser, LocalStackProcess, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

HELLO = "hello world"


def _pcm(wav_bytes: bytes) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(wav_bytes)) as w:
        return w.readframes(w.getnframes()), w.getframerate()


def _post_raw(user: ApiUser, path: str, data: bytes, content_type: str) -> requests.Response:
    headers = {**user.auth, "Content-Type": content_type}
    return requests.post(f"{user.api}{path}", data=data, headers=headers, timeout=30)


def _transcribe(user: ApiUser, data: bytes, name: str = "hello.wav") -> requests.Response:
    return user.post("/api/v1/speech/transcribe", files={"file": (name, data, "audio/wav")})


def test_an_uploaded_wav_is_transcribed(local_stack, new_user):
    response = _transcribe(new_user, speak_wav(HELLO))

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["code"] == 0
    assert "hello world" in answer["text"].lower()
    assert answer["segments"]


def test_raw_pcm_from_a_device_is_transcribed(local_stack, new_user):
    pcm, rate = _pcm(speak_wav(HELLO))

    response = _post_raw(
        new_user,
        f"/api/v1/speech/pcm?sample_rate={rate}&channels=1",
        pcm,
        "application/octet-stream",
    )

    assert response.status_code == 200, response.text
    assert "hello world" in response.json()["text"].lower()


def test_speech_errors_over_http(local_stack, new_user):
    octet = "application/octet-stream"
    not_audio = _transcribe(new_user, b"\x89PNG\r\n\x1a\n" + bytes(64), name="photo.wav")
    empty = _post_raw(new_user, "/api/v1/speech/pcm", b"", octet)
    odd = _post_raw(new_user, "/api/v1/speech/pcm", b"\x01\x02\x03", octet)
    absurd = _post_raw(new_user, "/api/v1/speech/pcm?sample_rate=1", b"\x00\x00", octet)
    too_big = _post_raw(new_user, "/api/v1/speech/pcm", bytes(4_000_002), octet)
    as_json = new_user.post("/api/v1/speech/pcm", json={"pcm": "AAAA"})

    assert (not_audio.status_code, not_audio.json()["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
    assert (empty.status_code, empty.json()["field"]) == (400, "body")
    assert (odd.status_code, odd.json()["field"]) == (400, "body")
    assert (absurd.status_code, absurd.json()["field"]) == (400, "sample_rate")
    assert too_big.status_code == 413
    assert as_json.status_code == 415


def test_long_audio_goes_through_s3_and_the_queue(local_stack, new_user):
    audio = speak_wav(HELLO)
    ticket = new_user.post(
        "/api/v1/speech/async", json={"filename": "talk.wav", "size_bytes": len(audio)}
    )
    assert ticket.status_code == 202, ticket.text
    upload = ticket.json()

    put = requests.put(
        upload["upload_url"], data=audio, headers=upload["upload_headers"], timeout=30
    )
    assert put.status_code == 200, put.text
    task = new_user.wait(upload["task_id"], timeout=60)

    assert (task["kind"], task["status"]) == ("speech", "DONE"), task
    assert "hello world" in task["text"].lower()
    transcript = new_user.get(f"/api/v1/speech/transcripts/{upload['task_id']}")
    assert transcript.status_code == 200
    assert "hello world" in transcript.json()["text"].lower()


@pytest.fixture(scope="module")
def two_speech_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStackProcess]:
    with running_stack(tmp_path_factory.mktemp("speech-stack"), "--speech-servers", "2") as stack:
        yield stack


def _register(stack: LocalStackProcess) -> ApiUser:
    username, password = f"s{uuid.uuid4().hex[:10]}", "pass1234word"
    response = requests.post(
        f"{stack.api}/register", json={"username": username, "password": password}, timeout=30
    )
    assert response.status_code == 201, response.text
    return ApiUser(stack.api, username, password, response.json()["token"])


def test_a_killed_speech_endpoint_is_skipped_then_503_when_none_is_left(two_speech_servers):
    user = _register(two_speech_servers)
    first, second = two_speech_servers.speech_servers
    requests.post(f"{first}/shutdown", timeout=5)

    answers = [_transcribe(user, speak_wav(HELLO)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert two_speech_servers.speech_stats(1)["calls"] == 3

    requests.post(f"{second}/shutdown", timeout=5)

    def no_speech_endpoint() -> bool:
        return _transcribe(user, speak_wav(HELLO)).status_code == 503

    # Refused calls open the circuits at once; the checker marks both down within a period.
    wait_for(no_speech_endpoint, timeout=30, interval=0.5, what="503, no speech endpoint left")
    last = _transcribe(user, speak_wav(HELLO))
    assert last.status_code == 503
    assert int(last.headers["Retry-After"]) >= 1
