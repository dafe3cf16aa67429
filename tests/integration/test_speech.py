"""Speech-to-text through the handlers (moto + the pocketsphinx stand-in): the synchronous
upload and PCM routes, their errors, dead endpoints, and long audio as a queued task."""

from __future__ import annotations

import importlib
import io
import json
import uuid
import wave

import boto3
import pytest
import requests

from gpuqueue.speech.audio import SYNC_AUDIO_MAX_BYTES
from gpuqueue_local.standins.speech_server import SpeechServerKnobs
from gpuqueue_testing import FakeLambdaContext, load_event, speak_wav

HELLO = "hello world"
BOUNDARY = "gpuqueue-test-boundary"


def multipart(fields: dict[str, tuple[str | None, bytes, str | None]]) -> tuple[bytes, str]:
    """{name: (filename, data, content type)} -> (body, Content-Type header)."""
    out = io.BytesIO()
    for name, (filename, data, content_type) in fields.items():
        out.write(f"--{BOUNDARY}\r\n".encode())
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"Content-Disposition: {disposition}\r\n".encode())
        if content_type:
            out.write(f"Content-Type: {content_type}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={BOUNDARY}"


def pcm_of(wav_bytes: bytes) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(wav_bytes)) as w:
        return w.readframes(w.getnframes()), w.getframerate()


def transcribe(h, user, fields):
    body, content_type = multipart(fields)
    return h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/transcribe",
        binary_body=body,
        user=user,
        headers={"content-type": content_type},
    )


def post_pcm(h, user, data: bytes, query: dict[str, str], content_type="application/octet-stream"):
    return h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/pcm",
        binary_body=data,
        query=query,
        user=user,
        headers={"content-type": content_type},
    )


@pytest.fixture
def speech_stack(make_stack):
    h = make_stack(speech=[SpeechServerKnobs()])
    h.run_checker()
    return h


def test_an_uploaded_wav_comes_back_as_the_seeds_transcript(speech_stack, alice):
    response = transcribe(
        speech_stack, alice, {"file": ("hello.wav", speak_wav(HELLO), "audio/wav")}
    )

    assert response.status == 200, response.body
    answer = response.json()
    assert answer["code"] == 0
    assert "hello" in answer["text"].lower()
    assert "world" in answer["text"].lower()
    assert answer["language"] == "en"
    assert answer["duration"] > 0.5
    assert answer["segments"]
    assert {"start", "end", "text"} <= set(answer["segments"][0])


def test_raw_pcm_is_wrapped_and_transcribed(speech_stack, alice):
    pcm, rate = pcm_of(speak_wav(HELLO))

    response = post_pcm(speech_stack, alice, pcm, {"sample_rate": str(rate), "channels": "1"})

    assert response.status == 200, response.body
    assert "hello world" in response.json()["text"].lower()


@pytest.mark.parametrize(
    ("data", "query", "expected"),
    [
        (b"", {}, ("body", "empty")),
        (b"\x00\x01\x02", {}, ("body", "odd")),
        (b"\x00\x00" * 100, {"sample_rate": "1000000"}, ("sample_rate", "sample_rate")),
        (b"\x00\x00" * 100, {"channels": "7"}, ("channels", "channels")),
    ],
)
def test_bad_pcm_is_a_400_naming_the_problem(speech_stack, alice, data, query, expected):
    field, words = expected
    response = post_pcm(speech_stack, alice, data, query)

    assert response.status == 400, response.body
    assert response.json()["field"] == field
    assert words in response.json()["error"].lower()


def test_pcm_sent_as_json_is_a_415(speech_stack, alice):
    response = post_pcm(speech_stack, alice, b"\x00\x00" * 10, {}, content_type="application/json")

    assert response.status == 415
    assert response.json()["field"] == "Content-Type"


def test_a_file_that_is_not_audio_is_a_415(speech_stack, alice):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

    response = transcribe(speech_stack, alice, {"file": ("photo.wav", png, "audio/wav")})

    assert response.status == 415
    assert response.json()["code"] == "UNSUPPORTED_MEDIA_TYPE"


def test_an_empty_file_and_a_missing_file_are_400s(speech_stack, alice):
    empty = transcribe(speech_stack, alice, {"file": ("a.wav", b"", "audio/wav")})
    missing = transcribe(speech_stack, alice, {"language": (None, b"en", None)})

    assert (empty.status, empty.json()["field"]) == (400, "file")
    assert (missing.status, missing.json()["field"]) == (400, "file")


def test_a_body_over_the_sync_limit_is_a_413(speech_stack, alice):
    response = post_pcm(speech_stack, alice, b"\x00\x00" * (SYNC_AUDIO_MAX_BYTES // 2 + 1), {})

    assert response.status == 413
    assert "async" in response.json()["error"]


def test_no_healthy_speech_endpoint_is_a_503_with_retry_after(make_stack, alice):
    h = make_stack()  # image endpoints only
    h.run_checker()

    response = transcribe(h, alice, {"file": ("hello.wav", speak_wav(HELLO), "audio/wav")})

    assert response.status == 503
    assert int(response.headers["retry-after"]) >= 1


def test_dead_speech_endpoints_give_502_then_503_once_the_checker_saw_them(make_stack, alice):
    h = make_stack(speech=[SpeechServerKnobs(), SpeechServerKnobs()])
    h.run_checker()
    for server in h.speech_servers:
        server.stop()
    clip = {"file": ("hello.wav", speak_wav(HELLO), "audio/wav")}

    # The table still says healthy: both are tried (one retry), both refuse.
    refused = transcribe(h, alice, clip)
    h.run_checker()
    none_left = transcribe(h, alice, clip)

    assert (refused.status, refused.json()["code"]) == (502, "UPSTREAM_FAILED")
    assert none_left.status == 503
    assert int(none_left.headers["retry-after"]) >= 1


def test_one_dead_endpoint_of_two_costs_one_retry_and_still_answers(make_stack, alice):
    h = make_stack(speech=[SpeechServerKnobs(), SpeechServerKnobs()])
    h.run_checker()
    dead, alive = h.speech_servers
    dead.stop()

    answers = [
        transcribe(h, alice, {"file": ("hello.wav", speak_wav(HELLO), "audio/wav")})
        for _ in range(3)
    ]

    assert [a.status for a in answers] == [200, 200, 200]
    assert alive.stats()["calls"] == 3


def test_an_endpoint_timeout_is_a_504(make_stack, alice):
    h = make_stack(speech=[SpeechServerKnobs(latency_s=5.0)], env={"SPEECH_TIMEOUT_SECONDS": "1"})
    h.run_checker()

    response = transcribe(h, alice, {"file": ("hello.wav", speak_wav(HELLO), "audio/wav")})

    assert response.status == 504
    assert response.json()["code"] == "UPSTREAM_TIMEOUT"


# --- long audio: a speech task through the queue ----------------------------------------------


def start_async(h, user, size: int, filename="talk.wav"):
    return h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/async",
        body={"filename": filename, "size_bytes": size},
        user=user,
    )


def test_long_audio_is_uploaded_queued_dispatched_and_transcribed(speech_stack, alice, bob):
    audio = speak_wav(HELLO)
    started = start_async(speech_stack, alice, len(audio))
    assert started.status == 202, started.body
    ticket = started.json()
    assert ticket["status"] == "AWAITING_UPLOAD"
    task_id = ticket["task_id"]

    put = requests.put(
        ticket["upload_url"], data=audio, headers=ticket["upload_headers"], timeout=30
    )
    assert put.status_code == 200, (put.text, ticket["upload_url"])  # S3 says why it refused
    assert speech_stack.get_task(alice, task_id).json()["status"] == "AWAITING_UPLOAD"
    speech_stack.audio_uploaded(f"audio/{task_id}", len(audio))
    assert speech_stack.get_task(alice, task_id).json()["status"] == "QUEUED"
    speech_stack.drain()

    task = speech_stack.get_task(alice, task_id).json()
    assert (task["kind"], task["status"]) == ("speech", "DONE")
    assert "hello world" in task["text"].lower()
    transcript = speech_stack.call(
        "speech_handler",
        "GET",
        f"/api/v1/speech/transcripts/{task_id}",
        route="/api/v1/speech/transcripts/{task_id}",
        path_params={"task_id": task_id},
        user=alice,
    )
    assert transcript.status == 200
    assert transcript.json()["code"] == 0
    assert "hello world" in transcript.json()["text"].lower()
    strangers = speech_stack.call(
        "speech_handler",
        "GET",
        f"/api/v1/speech/transcripts/{task_id}",
        route="/api/v1/speech/transcripts/{task_id}",
        path_params={"task_id": task_id},
        user=bob,
    )
    assert strangers.status == 404


def test_an_upload_of_another_size_than_announced_fails_the_task(speech_stack, alice):
    audio = speak_wav(HELLO)
    task_id = start_async(speech_stack, alice, len(audio) + 10).json()["task_id"]
    boto3.client("s3").put_object(
        Bucket=speech_stack.stack.ref("ImagesBucket"), Key=f"audio/{task_id}", Body=audio
    )

    speech_stack.audio_uploaded(f"audio/{task_id}", len(audio))

    task = speech_stack.get_task(alice, task_id).json()
    assert task["status"] == "FAILED"
    assert "announced" in task["error"]
    assert speech_stack.receive() == []  # nothing queued


def test_a_repeated_upload_event_queues_the_task_once(speech_stack, alice):
    audio = speak_wav(HELLO)
    task_id = start_async(speech_stack, alice, len(audio)).json()["task_id"]
    boto3.client("s3").put_object(
        Bucket=speech_stack.stack.ref("ImagesBucket"), Key=f"audio/{task_id}", Body=audio
    )

    speech_stack.audio_uploaded(f"audio/{task_id}", len(audio))
    speech_stack.drain()
    speech_stack.audio_uploaded(f"audio/{task_id}", len(audio))  # a duplicate, late

    assert speech_stack.get_task(alice, task_id).json()["status"] == "DONE"
    assert speech_stack.receive() == []
    assert speech_stack.speech_servers[0].stats()["calls"] == 1


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"filename": "talk.wav", "size_bytes": 0}, 400, "size_bytes"),
        ({"filename": "talk.wav", "size_bytes": 300_000_000}, 413, "size_bytes"),
        ({"filename": "slides.pdf", "size_bytes": 10}, 415, "file"),
        ({"size_bytes": 10}, 400, "filename"),
    ],
)
def test_bad_async_requests_are_refused(speech_stack, alice, body, status, field):
    response = speech_stack.call(
        "speech_handler", "POST", "/api/v1/speech/async", body=body, user=alice
    )

    assert response.status == status, response.body
    assert response.json()["field"] == field


def test_an_awaiting_upload_task_can_be_canceled(speech_stack, alice):
    task_id = start_async(speech_stack, alice, 100).json()["task_id"]

    canceled = speech_stack.cancel(alice, task_id)

    assert canceled.status == 200, canceled.body
    assert speech_stack.audio_uploaded(f"audio/{task_id}", 100) == {"queued": False}
    assert uuid.UUID(task_id)


def test_the_sample_pcm_event_is_answered_with_the_seeds_shape(speech_stack, alice):
    event = load_event("speech_pcm")
    event["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = alice.sub

    result = importlib.import_module("speech_handler").lambda_handler(
        event, FakeLambdaContext(function_name="speech")
    )

    assert result["statusCode"] == 200, result["body"]
    assert json.loads(result["body"])["code"] == 0


def test_audio_the_endpoint_cannot_decode_is_a_422(speech_stack, alice):
    # A WebM header (EBML magic): a format we accept, that this stand-in cannot decode.
    webm = bytes.fromhex("1a45dfa3") + bytes(200)

    response = transcribe(speech_stack, alice, {"file": ("talk.webm", webm, "audio/webm")})

    assert response.status == 422, response.body
    assert response.json()["code"] == "UNPROCESSABLE_AUDIO"
    assert response.json()["field"] == "file"


# --- the upload form's errors: answered before any audio is read or any endpoint called ------

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt "
FORM_BODY, FORM_TYPE = multipart({"file": ("a.wav", WAV, "audio/wav")})
NAMELESS_PART = (
    f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\n".encode()
    + WAV
    + f"\r\n--{BOUNDARY}--\r\n".encode()
)


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (
            ("application/json", b'{"file": "a.wav"}'),
            (415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type"),
        ),
        (("audio/wav", WAV), (415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type")),
        (("multipart/form-data", FORM_BODY), (400, "INVALID_INPUT", "Content-Type")),
        (("multipart/form-data; boundary=another", FORM_BODY), (400, "INVALID_INPUT", "body")),
        ((FORM_TYPE, b""), (400, "INVALID_INPUT", "body")),
        ((FORM_TYPE, b"the audio, without any form around it"), (400, "INVALID_INPUT", "body")),
        ((FORM_TYPE, NAMELESS_PART), (400, "INVALID_INPUT", "file")),
    ],
    ids=[
        "json",
        "bare-audio",
        "no-boundary",
        "other-boundary",
        "empty-body",
        "no-parts",
        "part-without-a-name",
    ],
)
def test_a_request_that_is_not_a_usable_form_is_a_4xx_naming_the_field(
    make_stack, alice, sent, answer
):
    h = make_stack(endpoints=[], speech=[SpeechServerKnobs()])
    h.run_checker()
    content_type, body = sent

    response = h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/transcribe",
        binary_body=body,
        user=alice,
        headers={"content-type": content_type},
    )

    status, code, field = answer
    assert response.status == status
    error = response.json()
    assert (error["code"], error["field"]) == (code, field)
    assert error["error"]
    assert h.speech_servers[0].stats()["calls"] == 0


def test_a_language_that_is_not_a_language_code_is_a_400_naming_it(speech_stack, alice):
    wav = speak_wav(HELLO)
    for language in ("x", "a-very-long-language-tag", "français"):
        response = transcribe(
            speech_stack,
            alice,
            {"file": ("hello.wav", wav, "audio/wav"), "language": (None, language.encode(), None)},
        )

        assert response.status == 400, language
        assert response.json()["field"] == "language"
    assert speech_stack.speech_servers[0].stats()["calls"] == 0
