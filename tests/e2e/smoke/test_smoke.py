"""Smoke: the seeds' client flow against one stack, deployed (`make smoke API_URL=...`) or
local (`make test`); conftest.py picks which. Only what any client can do over HTTP.

hello_world.wav was made once with `espeak-ng -v en-us -s 140 -w hello.wav "hello world"`,
then resampled to 16 kHz mono 16-bit PCM (the speech models' rate; low-pass, then linear,
as the speech stand-in resamples).
"""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import IMAGE_SIZE, PROMPT, SmokeTarget
from .smoke_api import FinishedTask, SmokeUser, fetch_image, png_size, sign_up

# The e2e tests' group: under xdist the local target is that worker's session stack.
pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group("local_stack")]

HELLO_WAV = Path(__file__).with_name("hello_world.wav")


def test_a_new_user_registers_logs_in_and_starts_with_no_tasks(target: SmokeTarget):
    newcomer = sign_up(target.api)
    listed = newcomer.get("/api/v1/tasks")
    wrong = requests.post(
        f"{target.api}/login",
        json={"username": newcomer.username, "password": newcomer.password + "x"},
        timeout=30,
    )

    assert listed.status_code == 200, listed.text
    assert listed.json() == []
    assert wrong.status_code == 401, wrong.text


def test_an_image_task_is_queued_then_ends_done(image_task: FinishedTask):
    task = image_task.assert_done()

    assert image_task.submitted["status"] == "QUEUED"
    assert set(image_task.seen) <= {"QUEUED", "RUNNING", "DONE"}, image_task.seen
    assert task["task_id"] == image_task.task_id
    assert task["prompt"] == PROMPT
    assert task["result_url"] == f"/api/images/{image_task.task_id}"


def test_the_image_redirects_to_a_png_of_the_requested_size(
    user: SmokeUser, image_task: FinishedTask
):
    task = image_task.assert_done()

    redirect, download = fetch_image(user, task["result_url"])

    assert redirect.status_code == 302, redirect.text
    assert download.status_code == 200, download.text[:500]
    assert png_size(download.content) == IMAGE_SIZE


def test_the_callers_task_list_holds_the_task(user: SmokeUser, image_task: FinishedTask):
    listed = user.get("/api/v1/tasks", params={"limit": 5})

    assert listed.status_code == 200, listed.text
    assert image_task.task_id in [t["task_id"] for t in listed.json()]


def test_stats_report_the_queue(user: SmokeUser):
    response = user.get("/api/v1/system/stats")

    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["queue_capacity"] > 0
    assert stats["queue_length"] >= 0
    assert stats["queue_usage"] == pytest.approx(
        100 * stats["queue_length"] / stats["queue_capacity"], abs=0.01
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/tasks?task_id={task_id}"),
        ("GET", "/api/v1/tasks?limit=5"),
        ("POST", "/api/v1/image/async"),
        ("GET", "/api/images/{task_id}"),
        ("GET", "/api/v1/system/stats"),
        ("POST", "/api/v1/speech/pcm"),
    ],
)
def test_without_a_token_the_api_answers_401(
    target: SmokeTarget, image_task: FinishedTask, method: str, path: str
):
    url = target.api + path.format(task_id=image_task.task_id)

    anonymous = requests.request(method, url, json={"prompt": "x"}, timeout=30)
    forged = requests.request(
        method, url, json={"prompt": "x"}, headers={"Authorization": "Bearer x.y.z"}, timeout=30
    )

    assert anonymous.status_code == 401, anonymous.text
    assert forged.status_code == 401, forged.text


def test_another_users_task_and_image_are_not_found(stranger: SmokeUser, image_task: FinishedTask):
    task = stranger.get("/api/v1/tasks", params={"task_id": image_task.task_id})
    image = stranger.get(f"/api/images/{image_task.task_id}", allow_redirects=False)
    listed = stranger.get("/api/v1/tasks", params={"limit": 100})

    assert task.status_code == 404, task.text
    assert image.status_code == 404, image.text
    assert image_task.task_id not in [t["task_id"] for t in listed.json()]


def _assert_transcript(response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["code"] == 0, answer
    assert isinstance(answer["language"], str), answer
    assert answer["language"], answer
    assert answer["segments"], answer
    for segment in answer["segments"]:
        assert set(segment) >= {"start", "end", "text"}, segment
        assert 0 <= segment["start"] <= segment["end"], segment
    words = " ".join(segment["text"] for segment in answer["segments"]).strip()
    assert words, answer
    # espeak-ng's "hello world" is clear enough for any speech model to get the first word.
    assert "hello" in words.lower(), answer


@pytest.mark.usefixtures("speech_endpoints")
def test_an_uploaded_wav_is_transcribed(user: SmokeUser):
    response = user.post(
        "/api/v1/speech/transcribe",
        files={"file": ("hello_world.wav", HELLO_WAV.read_bytes(), "audio/wav")},
    )

    _assert_transcript(response)


@pytest.mark.usefixtures("speech_endpoints")
def test_raw_pcm_from_a_device_is_transcribed(user: SmokeUser):
    with wave.open(io.BytesIO(HELLO_WAV.read_bytes())) as clip:
        rate, channels = clip.getframerate(), clip.getnchannels()
        pcm = clip.readframes(clip.getnframes())

    response = user.post(
        "/api/v1/speech/pcm",
        params={"sample_rate": rate, "channels": channels},
        data=pcm,
        headers={"Content-Type": "application/octet-stream"},
    )

    _assert_transcript(response)
