"""Cog callback mode on the tasks and endpoints tables (moto) and the bucket, with a scripted
Cog server on 127.0.0.1: the dispatcher starts the prediction and returns with the slot
still leased and the task RUNNING under a whole generation's lease; scripted webhooks then
drive the task as Cog's would (progress at a bounded rate, DONE with the PNG in S3 and the
slot free, failed, canceled after a cancel call to the server, a wrong token, a duplicate
`completed`, a size too large for the callback route), webhooks racing the owner's cancel
or the reaper, a deleted endpoint, a failed slot release, and starts that never reach the
server. Last, GpuCallbackFunction's handler on a provisioned stack: a table or the bucket
failing answers 503 with Retry-After, and Cog's resend completes the task."""

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
from botocore.exceptions import ClientError

from gpuqueue.dispatch.cog_callbacks import (
    CallbackAnswer,
    CallbackPolicy,
    CallbackStarter,
    CogCallbacks,
)
from gpuqueue.dispatch.dispatcher import DispatchOutcome, DispatchPolicy, TaskDispatcher
from gpuqueue.dispatch.jobs import ImageJob
from gpuqueue.errors import InvalidInput, RetryLater, StoreError, TaskNotFound
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.gpu.cog_webhooks import CogPredictions, CogWebhook
from gpuqueue.gpu.image_client import image_answer_limit
from gpuqueue.models import (
    Endpoint,
    EndpointProtocol,
    HealthResult,
    ImageRequest,
    QueueMessage,
    SlotLease,
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


# --- the route's less travelled paths -----------------------------------------------------


def at_first_read(action: Callable[[], object]) -> Callable[[], float]:
    """A clock that runs `action` the first time it is read: another writer (the owner's
    cancel, the reaper) landing between the route's read of the task and its write."""
    pending = [action]

    def clock() -> float:
        while pending:
            pending.pop()()
        return time.time()

    return clock


def reaped(world: World, task_id: str) -> Callable[[], object]:
    """The reaper putting the task back as if its lease had ended (a stalled attempt)."""
    return lambda: world.tasks.requeue_abandoned(
        world.task(task_id), now=time.time() + 3600, error="its lease ended"
    )


def test_a_webhook_without_logs_writes_nothing(world, cog):
    task, prediction, token = started(world, cog)

    answer = world.callbacks.receive(task.task_id, token, hook(prediction, "starting"))

    assert answer is CallbackAnswer.NOTHING_NEW
    assert world.task(task.task_id).progress is None


def test_the_same_step_count_again_is_not_written_again(world, cog):
    task, prediction, token = started(world, cog)
    world.callbacks.receive(task.task_id, token, hook(prediction, "processing", logs="step 2/20\n"))
    written = world.task(task.task_id)
    world.callbacks._clock = lambda: time.time() + 2.5  # past the 2 s between writes

    # Cog's logs are cumulative: a webhook with nothing new in them ends on the same step.
    again = world.callbacks.receive(
        task.task_id, token, hook(prediction, "processing", logs="step 2/20\nloading\n")
    )

    assert again is CallbackAnswer.NOTHING_NEW
    assert world.task(task.task_id).updated_at == written.updated_at


def test_a_logs_webhook_after_the_end_changes_nothing(world, cog):
    task, prediction, token = started(world, cog)
    world.callbacks.receive(
        task.task_id, token, hook(prediction, "succeeded", output=data_url(PNG))
    )
    done = world.task(task.task_id)

    late = world.callbacks.receive(
        task.task_id, token, hook(prediction, "processing", logs="step 19/20\n")
    )

    assert late is CallbackAnswer.STALE
    after = world.task(task.task_id)
    assert after.status is TaskStatus.DONE
    assert (after.updated_at, after.progress) == (done.updated_at, None)


def test_a_cancel_asked_between_the_read_and_the_progress_write_is_sent(world, cog):
    task, prediction, token = started(world, cog)
    world.callbacks._clock = at_first_read(lambda: world.tasks.cancel(task.task_id, "alice"))

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "processing", logs="step 3/20\n")
    )

    assert answer is CallbackAnswer.CANCEL_SENT
    (cancel,) = cog.cancels()
    assert cancel["path"] == f"/predictions/{prediction}/cancel"
    assert world.task(task.task_id).progress is None


def test_progress_from_an_attempt_the_reaper_put_back_is_not_written(world, cog):
    task, prediction, token = started(world, cog)
    world.callbacks._clock = at_first_read(reaped(world, task.task_id))

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "processing", logs="step 3/20\n")
    )

    assert answer is CallbackAnswer.STALE
    requeued = world.task(task.task_id)
    assert requeued.status is TaskStatus.QUEUED
    assert requeued.progress is None


@pytest.mark.parametrize(
    ("status", "fields"), [("succeeded", {"output": data_url(PNG)}), ("failed", {"error": "boom"})]
)
def test_a_completed_webhook_racing_the_reaper_leaves_the_task_to_its_next_attempt(
    world, cog, status, fields
):
    task, prediction, token = started(world, cog)
    world.callbacks._clock = at_first_read(reaped(world, task.task_id))

    answer = world.callbacks.receive(task.task_id, token, hook(prediction, status, **fields))

    assert answer is CallbackAnswer.STALE
    requeued = world.task(task.task_id)
    assert requeued.status is TaskStatus.QUEUED
    assert requeued.error == "its lease ended"
    assert world.slot_rows() == []  # the slot this attempt held is free for the next


def test_a_canceled_webhook_for_a_task_already_ended_canceled_changes_nothing(world, cog):
    task, prediction, token = started(world, cog)
    world.tasks.cancel(task.task_id, "alice")

    def put_back_and_ended_by_the_next_dispatcher() -> None:
        reaped(world, task.task_id)()
        assert world.tasks.end_canceled(world.task(task.task_id))

    world.callbacks._clock = at_first_read(put_back_and_ended_by_the_next_dispatcher)

    answer = world.callbacks.receive(task.task_id, token, hook(prediction, "canceled"))

    assert answer is CallbackAnswer.STALE
    assert world.task(task.task_id).status is TaskStatus.CANCELED
    assert world.slot_rows() == []


def test_a_cancel_for_a_deleted_endpoint_is_sent_nowhere(world, cog):
    task, prediction, token = started(world, cog)
    world.tasks.cancel(task.task_id, "alice")
    assert world.registry.delete("cog-1")

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "processing", logs="step 3/20\n")
    )

    assert answer is CallbackAnswer.NOTHING_NEW
    assert cog.cancels() == []
    assert world.task(task.task_id).status is TaskStatus.RUNNING  # its lease's end settles it


def test_a_cancel_the_server_cannot_take_is_asked_again_by_the_next_webhook(world, cog):
    task, prediction, token = started(world, cog)
    world.tasks.cancel(task.task_id, "alice")
    cog.server.shutdown()
    cog.server.server_close()  # the server went away: the cancel call is refused

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "processing", logs="step 3/20\n")
    )

    # 200, not 5xx: a 5xx would have Cog resend this webhook only; the next one asks again.
    assert answer is CallbackAnswer.CANCEL_SENT
    assert world.task(task.task_id).status is TaskStatus.RUNNING


def test_an_image_from_a_deleted_endpoint_still_completes_the_task(world, cog):
    task, prediction, token = started(world, cog)
    assert world.registry.delete("cog-1")

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "succeeded", output=data_url(PNG))
    )

    assert answer is CallbackAnswer.DONE
    done = world.task(task.task_id)
    assert done.status is TaskStatus.DONE
    assert done.result_key is not None
    assert world.s3.get_object(Bucket=world.bucket, Key=done.result_key)["Body"].read() == PNG


def test_an_output_larger_than_any_image_of_its_size_fails_the_task_undecoded(world, cog):
    task, prediction, token = started(world, cog)
    oversized = "data:image/png;base64," + "A" * image_answer_limit(task.params)

    answer = world.callbacks.receive(
        task.task_id, token, hook(prediction, "succeeded", output=[oversized])
    )

    assert answer is CallbackAnswer.FAILED
    failed = world.task(task.task_id)
    assert "larger than its size allows" in (failed.error or "")
    assert world.s3.list_objects_v2(Bucket=world.bucket).get("KeyCount") == 0
    assert world.slot_rows() == []


class SlotWritesFail(EndpointRegistry):
    """The endpoints table refusing the slot's release (throttled)."""

    def release_slot(self, lease: SlotLease, *, call_seconds: float | None = None) -> None:
        throttled = {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}
        raise StoreError("endpoints table", ClientError(throttled, "UpdateItem"))  # type: ignore[arg-type]


def test_a_slot_release_that_fails_still_ends_the_task(world, cog):
    task, prediction, token = started(world, cog)
    callbacks = CogCallbacks(
        world.tasks,
        SlotWritesFail(world.registry._table),
        ImageStore(world.s3, world.bucket),
        CogPredictions(),
    )

    answer = callbacks.receive(
        task.task_id, token, hook(prediction, "succeeded", output=data_url(PNG))
    )

    assert answer is CallbackAnswer.DONE
    assert world.task(task.task_id).status is TaskStatus.DONE
    (slot,) = world.slot_rows()  # still leased: it lapses at the lease's end
    assert slot["task_id"] == task.task_id


def test_a_start_whose_task_the_reaper_put_back_sends_nothing(world, cog):
    task = world.submit()
    assert world.dispatcher._callbacks is not None
    world.dispatcher._callbacks._clock = at_first_read(reaped(world, task.task_id))

    outcome = world.dispatch(task)

    assert outcome is DispatchOutcome.SKIPPED
    assert cog.started() == []
    assert world.task(task.task_id).status is TaskStatus.QUEUED


def test_a_start_after_the_slots_lease_ran_out_sends_nothing_and_requeues(world, cog):
    task = world.submit()
    assert world.dispatcher._callbacks is not None
    # The worker stalled between taking the slot and starting the call: its lease is over.
    world.dispatcher._callbacks._clock = lambda: time.time() + 3600

    with pytest.raises(RetryLater, match="slot's lease ended"):
        world.dispatch(task)

    assert cog.started() == []
    requeued = world.task(task.task_id)
    assert requeued.status is TaskStatus.QUEUED
    assert requeued.error == "the slot's lease ended before the call"


def test_an_unreachable_server_fails_the_start_as_a_call_that_failed(world, cog):
    cog.server.shutdown()
    cog.server.server_close()
    task = world.submit()

    outcome = world.dispatch(task)

    assert outcome is DispatchOutcome.FAILED
    assert "unreachable" in (world.task(task.task_id).error or "")
    assert world.slot_rows() == []


def test_a_start_the_server_refuses_fails_the_task_without_a_retry(world, cog):
    cog.start_status = 422  # the input is not one this model takes
    task = world.submit()

    outcome = world.dispatch(task)

    assert outcome is DispatchOutcome.FAILED
    assert len(cog.started()) == 1
    assert "refused the prediction: HTTP 422" in (world.task(task.task_id).error or "")
    assert world.slot_rows() == []


# --- through GpuCallbackFunction's handler, on a provisioned stack -----------------------

CALLBACK_ROUTE = "/api/v1/callbacks/cog/{task_id}"


class CallbackStack:
    """A stack whose only image endpoint is the scripted Cog server in callback mode."""

    def __init__(self, harness: Any, cog: ScriptedCog) -> None:
        self.h = harness
        self.cog = cog
        registry = EndpointRegistry(
            boto3.resource("dynamodb").Table(harness.stack.ref("EndpointsTable"))
        )
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

    def started(self, user: Any) -> tuple[str, str, str]:
        """A task submitted and dispatched: its id, its prediction id and its token."""
        answer = self.h.submit(user, {"prompt": "a lighthouse", "width": 64, "height": 64})
        assert answer.status == 202, answer.body
        task_id = answer.json()["task_id"]
        self.h.drain()
        (start,) = self.cog.started()
        return task_id, start["path"].rsplit("/", 1)[-1], token_of(start)

    def webhook(self, task_id: str, token: str, body: dict[str, Any]) -> Any:
        """Cog's POST, as API Gateway hands it to the function (no authorizer)."""
        return self.h.call(
            "gpu_callback_handler",
            "POST",
            CALLBACK_ROUTE.format(task_id=task_id),
            route=CALLBACK_ROUTE,
            path_params={"task_id": task_id},
            query={"token": token},
            body=body,
        )

    def status(self, user: Any, task_id: str) -> str:
        return str(self.h.get_task(user, task_id).json()["status"])


@pytest.fixture
def on_stack(make_stack: Callable[..., Any], cog: ScriptedCog) -> CallbackStack:
    return CallbackStack(make_stack(endpoints=[], env={"GPU_CALLBACK_BASE_URL": BASE_URL}), cog)


def test_webhooks_through_the_handler_report_progress_and_complete_the_task(on_stack, alice):
    task_id, prediction, token = on_stack.started(alice)

    wrong = on_stack.webhook(task_id, "not-the-token", {"id": prediction, "status": "succeeded"})
    progress = on_stack.webhook(
        task_id, token, {"id": prediction, "status": "processing", "logs": "step 5/20\n"}
    )
    done = on_stack.webhook(
        task_id, token, {"id": prediction, "status": "succeeded", "output": data_url(PNG)}
    )

    assert wrong.status == 404
    assert (progress.status, progress.json()) == (200, {"task_id": task_id, "result": "progress"})
    assert (done.status, done.json()) == (200, {"task_id": task_id, "result": "done"})
    assert on_stack.status(alice, task_id) == "DONE"


def test_a_bucket_failure_answers_503_and_cogs_resend_completes_the_task(on_stack, alice):
    task_id, prediction, token = on_stack.started(alice)
    s3 = boto3.client("s3")
    bucket = on_stack.h.stack.ref("ImagesBucket")
    s3.delete_bucket(Bucket=bucket)  # empty: nothing was stored yet
    completed = {"id": prediction, "status": "succeeded", "output": data_url(PNG)}

    refused = on_stack.webhook(task_id, token, completed)

    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["code"] == "SERVICE_UNAVAILABLE"
    assert on_stack.status(alice, task_id) == "RUNNING"
    s3.create_bucket(Bucket=bucket)  # the bucket is back: Cog sends the webhook again
    again = on_stack.webhook(task_id, token, completed)
    assert (again.status, again.json()["result"]) == (200, "done")
    assert on_stack.status(alice, task_id) == "DONE"


def test_a_tasks_table_failure_answers_503_so_cog_sends_the_webhook_again(on_stack, alice):
    task_id, prediction, token = on_stack.started(alice)
    boto3.client("dynamodb").delete_table(TableName=on_stack.h.stack.ref("TasksTable"))

    refused = on_stack.webhook(
        task_id, token, {"id": prediction, "status": "processing", "logs": "step 5/20\n"}
    )

    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
