"""Cog callback mode on the tasks and endpoints tables (moto) and the bucket, with a scripted
Cog server on 127.0.0.1: the dispatcher starts the prediction and returns with the slot
still leased and the task RUNNING under a whole generation's lease; scripted webhooks then
drive the task as Cog's would (progress at a bounded rate, DONE with the PNG in S3 and the
slot free, failed, canceled after a cancel call to the server, a wrong token, a duplicate
`completed`, a size too large for the callback route)."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

from gpuqueue.dispatch.cog_callbacks import (
    CallbackAnswer,
    CallbackPolicy,
    CallbackStarter,
    CogCallbacks,
)
from gpuqueue.dispatch.dispatcher import DispatchOutcome, DispatchPolicy, TaskDispatcher
from gpuqueue.dispatch.jobs import ImageJob
from gpuqueue.errors import InvalidInput, TaskNotFound
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.gpu.cog_webhooks import CogPredictions, CogWebhook
from gpuqueue.models import (
    Endpoint,
    EndpointProtocol,
    HealthResult,
    ImageRequest,
    QueueMessage,
    Task,
    TaskKind,
    TaskStatus,
)
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_store import TaskStore
from gpuqueue_local import moto_iam

TIMEOUT = 30
PLENTY = 900.0
BASE_URL = "https://api.example.test"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class ScriptedCog:
    """Answers `PUT /predictions/{id}` (202 unless told otherwise) and
    `POST /predictions/{id}/cancel` (200), and remembers every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.start_status = 202
        cog = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                seen = {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": json.loads(raw) if raw else None,
                }
                cog.requests.append(seen)
                return seen

            def do_PUT(self) -> None:
                seen = self._record()
                prediction = self.path.rsplit("/", 1)[-1]
                self._answer(cog.start_status, {"id": prediction, "status": "starting"})
                del seen

            def do_POST(self) -> None:
                self._record()
                self._answer(200, {})

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def started(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "PUT"]

    def cancels(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/cancel")]


@pytest.fixture
def cog() -> Iterator[ScriptedCog]:
    server = ScriptedCog()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


class World:
    def __init__(self, tasks: TaskStore, registry: EndpointRegistry, s3: Any, bucket: str) -> None:
        self.tasks = tasks
        self.registry = registry
        self.s3 = s3
        self.bucket = bucket
        predictions = CogPredictions()
        self.dispatcher = TaskDispatcher(
            tasks=tasks,
            registry=registry,
            jobs={TaskKind.IMAGE: ImageJob({}, ImageStore(s3, bucket))},  # no sync call here
            policy=DispatchPolicy(
                task_timeout_seconds=TIMEOUT, max_attempts=3, health_max_age_seconds=60
            ),
            callbacks=CallbackStarter(predictions, tasks, registry, base_url=BASE_URL),
        )
        self.callbacks = CogCallbacks(
            tasks,
            registry,
            ImageStore(s3, bucket),
            predictions,
            policy=CallbackPolicy(progress_write_seconds=2.0),
        )

    def submit(self, **params: Any) -> Task:
        request = ImageRequest(prompt="a lighthouse", **{"width": 64, "height": 64, **params})
        return self.tasks.create_image_task("alice", request, queue_ttl_seconds=600)

    def dispatch(self, task: Task) -> DispatchOutcome:
        return self.dispatcher.dispatch(
            QueueMessage(task_id=task.task_id), remaining_seconds=lambda: PLENTY
        )

    def task(self, task_id: str) -> Task:
        found = self.tasks.get(task_id)
        assert found is not None
        return found

    def slot_rows(self) -> list[dict[str, Any]]:
        items = self.registry._table.scan()["Items"]
        return [i for i in items if i.get("row_type") == "slot" and "lease_id" in i]


@pytest.fixture
def world(template_table: Callable[[str], Any], moto_url: str, cog: ScriptedCog) -> World:
    tasks = TaskStore(template_table("TasksTable"))
    registry = EndpointRegistry(template_table("EndpointsTable"))
    added = registry.put(
        Endpoint(
            endpoint_id="cog-1",
            url=cog.url,
            kind=TaskKind.IMAGE,
            protocol=EndpointProtocol.COG,
            callback=True,
        )
    )
    registry.record_health(
        HealthResult(endpoint_id="cog-1", healthy=True, latency_ms=5.0, checked_at=time.time()),
        added,
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id=moto_iam.ADMIN_ACCESS_KEY_ID,
        aws_secret_access_key=moto_iam.ADMIN_SECRET_ACCESS_KEY,
    )
    bucket = f"files-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return World(tasks, registry, s3, bucket)


def token_of(start: dict[str, Any]) -> str:
    webhook = urlsplit(start["body"]["webhook"])
    return parse_qs(webhook.query)["token"][0]


def hook(prediction: str, status: str, **fields: Any) -> CogWebhook:
    return CogWebhook.model_validate({"id": prediction, "status": status, **fields})


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def started(world: World, cog: ScriptedCog) -> tuple[Task, str, str]:
    """A task dispatched in callback mode: the task, its prediction id and its token."""
    task = world.submit(steps=20)
    assert world.dispatch(task) is DispatchOutcome.DETACHED
    (start,) = cog.started()
    return task, start["path"].rsplit("/", 1)[-1], token_of(start)


def test_the_dispatcher_starts_the_prediction_and_returns_with_the_slot_leased(world, cog):
    task = world.submit(steps=20)
    before = time.time()

    outcome = world.dispatch(task)

    assert outcome is DispatchOutcome.DETACHED
    (start,) = cog.started()
    assert start["headers"]["Prefer"] == "respond-async"
    assert start["body"]["input"]["prompt"] == "a lighthouse"
    assert start["body"]["webhook_events_filter"] == ["start", "logs", "completed"]
    webhook = urlsplit(start["body"]["webhook"])
    assert f"{webhook.scheme}://{webhook.netloc}" == BASE_URL
    assert webhook.path == f"/api/v1/callbacks/cog/{task.task_id}"
    running = world.task(task.task_id)
    assert running.status is TaskStatus.RUNNING
    assert running.lease_until is not None
    assert running.lease_until >= before + TIMEOUT
    assert running.callback is not None
    assert token_of(start) not in json.dumps(running.model_dump(mode="json"))  # a hash only
    (slot,) = world.slot_rows()
    assert slot["task_id"] == task.task_id
    assert float(slot["lease_until"]) == pytest.approx(running.lease_until, abs=0.01)


def test_a_second_task_waits_for_the_slot_the_first_still_holds(world, cog):
    started(world, cog)
    other = world.submit()

    with pytest.raises(Exception, match=r"slot|busy|free"):
        world.dispatcher.dispatch(
            QueueMessage(task_id=other.task_id), remaining_seconds=lambda: PLENTY
        )
    assert len(cog.started()) == 1


def test_progress_is_written_at_most_once_per_two_seconds(world, cog):
    task, prediction, token = started(world, cog)
    receive = world.callbacks.receive

    first = receive(task.task_id, token, hook(prediction, "processing", logs="step 2/20\n"))
    soon = receive(task.task_id, token, hook(prediction, "processing", logs="step 4/20\n"))

    assert (first, soon) == (CallbackAnswer.PROGRESS, CallbackAnswer.NOTHING_NEW)
    progress = world.task(task.task_id).progress
    assert progress is not None
    assert (progress.step, progress.steps) == (2, 20)
    # Two seconds on (the route's clock), the next count is written.
    world.callbacks._clock = lambda: time.time() + 2.5
    later = receive(task.task_id, token, hook(prediction, "processing", logs="step 9/20\n"))
    assert later is CallbackAnswer.PROGRESS
    progress = world.task(task.task_id).progress
    assert progress is not None
    assert progress.step == 9
    assert progress.fraction == 0.45


def test_succeeded_stores_the_png_marks_done_and_frees_the_slot(world, cog):
    task, prediction, token = started(world, cog)

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "succeeded", output=data_url(PNG), logs="")
    )

    assert answer is CallbackAnswer.DONE
    done = world.task(task.task_id)
    assert done.status is TaskStatus.DONE
    assert done.result_key is not None
    stored = world.s3.get_object(Bucket=world.bucket, Key=done.result_key)["Body"].read()
    assert stored == PNG
    assert world.slot_rows() == []


def test_a_duplicate_completed_webhook_changes_nothing(world, cog):
    task, prediction, token = started(world, cog)
    completed = hook(prediction, "succeeded", output=data_url(PNG))
    world.callbacks.receive(task.task_id, token, completed)
    ended = world.task(task.task_id)
    # Another task takes the slot meanwhile: the late webhook must not free it.
    other = world.submit()
    assert world.dispatch(other) is DispatchOutcome.DETACHED

    again = world.callbacks.receive(task.task_id, token, completed)

    assert again is CallbackAnswer.STALE
    assert world.task(task.task_id).updated_at == ended.updated_at
    (slot,) = world.slot_rows()
    assert slot["task_id"] == other.task_id


def test_failed_ends_the_task_failed_with_cogs_error_and_frees_the_slot(world, cog):
    task, prediction, token = started(world, cog)

    answer = world.callbacks.receive(
        task.task_id,
        token,
        hook(prediction, "failed", error="Prediction failed: ValueError: boom at step 2"),
    )

    assert answer is CallbackAnswer.FAILED
    failed = world.task(task.task_id)
    assert failed.status is TaskStatus.FAILED
    assert failed.error is not None
    assert "boom at step 2" in failed.error
    assert world.slot_rows() == []


def test_a_cancel_is_sent_to_the_server_and_canceled_ends_the_task(world, cog):
    task, prediction, token = started(world, cog)
    world.tasks.cancel(task.task_id, "alice")

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "processing", logs="step 3/20\n")
    )

    assert answer is CallbackAnswer.CANCEL_SENT
    (cancel,) = cog.cancels()
    assert cancel["path"] == f"/predictions/{prediction}/cancel"
    ended = world.callbacks.receive(task.task_id, token, hook(prediction, "canceled"))
    assert ended is CallbackAnswer.CANCELED
    assert world.task(task.task_id).status is TaskStatus.CANCELED
    assert world.slot_rows() == []


def test_a_cancel_seen_only_at_completion_stores_no_image(world, cog):
    task, prediction, token = started(world, cog)
    world.tasks.cancel(task.task_id, "alice")

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "succeeded", output=data_url(PNG))
    )

    assert answer is CallbackAnswer.CANCELED
    canceled = world.task(task.task_id)
    assert canceled.status is TaskStatus.CANCELED
    assert canceled.result_key is None
    assert world.s3.list_objects_v2(Bucket=world.bucket).get("KeyCount") == 0
    assert world.slot_rows() == []


@pytest.mark.parametrize("token", [None, "", "not-the-token"])
def test_a_wrong_or_missing_token_is_not_found(world, cog, token):
    task, prediction, _ = started(world, cog)

    with pytest.raises(TaskNotFound):
        world.callbacks.receive(task.task_id, token, hook(prediction, "succeeded"))
    with pytest.raises(TaskNotFound):
        world.callbacks.receive("no-such-task", token, hook(prediction, "succeeded"))
    assert world.task(task.task_id).status is TaskStatus.RUNNING


def test_a_webhook_of_another_prediction_is_refused(world, cog):
    task, _, token = started(world, cog)

    with pytest.raises(InvalidInput):
        world.callbacks.receive(task.task_id, token, hook("pred_other", "succeeded"))


def test_an_output_that_is_not_a_png_fails_the_task(world, cog):
    task, prediction, token = started(world, cog)

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "succeeded", output=data_url(b"GIF89a..."))
    )

    assert answer is CallbackAnswer.FAILED
    assert "not a PNG" in (world.task(task.task_id).error or "")


def test_an_image_too_large_for_the_callback_route_goes_the_sync_way(world, cog):
    # 1024x1024: its largest PNG as base64 is over Lambda's 6 MB request.
    task = world.submit(width=1024, height=1024)

    with pytest.raises(KeyError):  # the sync adapter (none registered here) was asked
        world.dispatch(task)
    assert cog.started() == []


def test_a_busy_server_fails_the_start_as_a_call_that_failed(world, cog):
    cog.start_status = 409  # Cog's one slot taken by someone else
    task = world.submit()

    outcome = world.dispatch(task)

    # As a sync call that failed: tried again (here on the only endpoint) up to its attempts.
    assert outcome is DispatchOutcome.FAILED
    assert len(cog.started()) == 3
    failed = world.task(task.task_id)
    assert failed.status is TaskStatus.FAILED
    assert "409" in (failed.error or "")
    assert world.slot_rows() == []
