"""SpeechTasks, the long-audio routes' domain calls, on in-memory rows: the announced task
and its upload URL, its refusals (counted like a submit's), and the transcript route's."""

from __future__ import annotations

from typing import Any, cast

import pytest

from fakes import MetricsRecorder, RowTable
from gpuqueue.errors import (
    InvalidInput,
    PayloadTooLarge,
    RateLimited,
    TaskNotFound,
    TaskStateConflict,
)
from gpuqueue.intake.intake_metrics import IntakeMetrics
from gpuqueue.intake.rate_limiter import RateDecision
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.models import SpeechAsyncRequest, Task, TaskKind, TaskStatus
from gpuqueue.speech.audio import ASYNC_AUDIO_MAX_BYTES
from gpuqueue.speech.audio_store import AudioStore
from gpuqueue.speech.speech_tasks import SpeechTasks
from gpuqueue.store.task_store import TaskStore


class SigningS3:
    """generate_presigned_url as S3's client answers it, recording what was signed."""

    def __init__(self) -> None:
        self.signed: list[dict[str, Any]] = []

    def generate_presigned_url(self, method: str, *, Params: Any, ExpiresIn: int) -> str:
        self.signed.append({"method": method, **Params, "ExpiresIn": ExpiresIn})
        return f"https://bucket.s3/{Params['Key']}?signed"


def _speech_tasks(table: RowTable, s3: SigningS3 | None = None) -> SpeechTasks:
    submissions = SubmissionService(
        tasks=TaskStore(cast(Any, table)), queue=cast(Any, None), capacity=10
    )
    return SpeechTasks(submissions, AudioStore(cast(Any, s3), "bucket"), upload_url_ttl_seconds=900)


def test_an_announced_upload_is_a_task_awaiting_it_with_a_put_url_for_exactly_its_size():
    table, s3 = RowTable(), SigningS3()
    request = SpeechAsyncRequest(filename="talk.mp3", size_bytes=1234)

    started = _speech_tasks(table, s3).start_upload("alice", request, groups=frozenset())

    answer = started.answer
    assert answer.status is TaskStatus.AWAITING_UPLOAD
    assert table.rows[answer.task_id]["user_id"] == "alice"
    assert answer.upload_url == f"https://bucket.s3/audio/{answer.task_id}?signed"
    assert answer.upload_method == "PUT"
    assert answer.upload_headers == {"Content-Type": "audio/mpeg"}
    assert answer.expires_in == 900
    assert s3.signed == [
        {
            "method": "put_object",
            "Bucket": "bucket",
            "Key": f"audio/{answer.task_id}",
            "ContentLength": 1234,
            "ContentType": "audio/mpeg",
            "ExpiresIn": 900,
        }
    ]
    assert started.rate_headers == {}  # no rate limiter on this service


def test_audio_over_the_async_bound_is_refused_before_any_task_is_written():
    table = RowTable()
    request = SpeechAsyncRequest(filename="long.wav", size_bytes=ASYNC_AUDIO_MAX_BYTES + 1)

    with pytest.raises(PayloadTooLarge):
        _speech_tasks(table).start_upload("alice", request, groups=frozenset())
    assert table.rows == {}


def _stored(table: RowTable, task: Task) -> None:
    table.rows[task.task_id] = task.model_dump(mode="json")


def _task(kind: TaskKind, status: TaskStatus, owner: str = "alice") -> Task:
    return Task(
        task_id="t1",
        user_id=owner,
        kind=kind,
        status=status,
        created_at="2027-01-15T08:00:00+00:00",
        updated_at="2027-01-15T08:00:00+00:00",
        attempt=0,
    )


@pytest.mark.parametrize(
    ("task", "refusal"),
    [
        (_task(TaskKind.SPEECH, TaskStatus.DONE, owner="bob"), TaskNotFound),
        (_task(TaskKind.IMAGE, TaskStatus.DONE), InvalidInput),
        (_task(TaskKind.SPEECH, TaskStatus.RUNNING), TaskStateConflict),
    ],
)
def test_a_transcript_is_only_a_done_speech_task_of_the_caller(task: Task, refusal: type) -> None:
    table = RowTable()
    _stored(table, task)

    with pytest.raises(refusal):
        _speech_tasks(table).transcript("t1", "alice")


class SpentBucket:
    """A RateLimiter whose bucket is empty: every take is refused."""

    rate_per_second = 0.5

    def take(self, owner: str) -> RateDecision:
        return RateDecision(
            allowed=False, limit=5, remaining=0, retry_after_seconds=2, reset_seconds=10
        )


def test_an_announcement_over_the_rate_is_refused_and_counted_like_a_submit():
    table, recorder = RowTable(), MetricsRecorder()
    submissions = SubmissionService(
        tasks=TaskStore(cast(Any, table)),
        queue=cast(Any, None),
        capacity=10,
        limiter=cast(Any, SpentBucket()),
        metrics=IntakeMetrics(cast(Any, recorder)),
    )
    speech_tasks = SpeechTasks(
        submissions, AudioStore(cast(Any, None), "bucket"), upload_url_ttl_seconds=900
    )
    request = SpeechAsyncRequest(filename="talk.mp3", size_bytes=1234)

    with pytest.raises(RateLimited):
        speech_tasks.start_upload("alice", request, groups=frozenset())
    assert recorder.added == ["RateLimitHits"]
    assert table.rows == {}
