"""The dispatcher: endpoint choice, retries, failures, duplicates, leases."""

from __future__ import annotations

import threading
import time

import boto3
from botocore.exceptions import ClientError

from gpuqueue.dispatch.dispatcher import SAFETY_MARGIN_SECONDS
from gpuqueue.errors import StoreError
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.models import ImageRequest, TaskKind
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_store import TaskStore
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import wait_for


def _result_objects(h) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(
        Bucket=h.stack.ref("ImagesBucket"), Prefix="results/"
    )
    return [o["Key"] for o in listed.get("Contents", [])]


def _endpoint_rows(h) -> dict[str, dict]:
    table = boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable"))
    return {row["url"]: row for row in table.scan()["Items"]}


def test_checker_marks_a_stopped_endpoint_unhealthy_and_dispatch_avoids_it(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(), ImageServerKnobs()])
    alive, stopped = h.image_servers
    assert h.run_checker() == {"checked": 2, "healthy": 2}

    stopped.stop()
    assert h.run_checker() == {"checked": 2, "healthy": 1}
    rows = _endpoint_rows(h)
    assert rows[stopped.url]["healthy"] is False
    assert rows[stopped.url]["last_error"]
    assert int(rows[stopped.url]["consecutive_failures"]) == 1
    assert rows[alive.url]["healthy"] is True

    ids = [h.submit(alice).json()["task_id"] for _ in range(4)]
    h.drain()
    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 4
    assert all(h.task_row(i)["attempt"] == 1 for i in ids)
    assert alive.stats()["calls"] == 4


def test_recovered_endpoint_gets_work_again_after_the_next_check(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(healthy=False)])
    server = h.image_servers[0]
    assert h.run_checker()["healthy"] == 0
    task_id = h.submit(alice).json()["task_id"]
    h.deliver(h.receive())
    assert h.task_row(task_id)["status"] == "QUEUED"
    assert h.task_row(task_id)["attempt"] == 0  # waiting for a GPU costs no attempt
    assert server.stats()["calls"] == 0

    server.knobs.healthy = True
    assert h.run_checker()["healthy"] == 1
    h.drain()
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def test_waiting_out_a_gpu_outage_never_dead_letters_the_task(make_stack, alice):
    # Given no healthy endpoint and a queue that dead-letters after 5 receives
    h = make_stack(endpoints=[ImageServerKnobs(healthy=False)], parameters={"MaxReceiveCount": "5"})
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]

    # When the dispatcher sees the task more times than maxReceiveCount
    for _ in range(8):
        messages = wait_for(h.receive, what="the requeued message")
        assert h.deliver(messages) == []

    # Then it is still QUEUED with no attempt spent, nothing is in the DLQ, and it runs
    # as soon as the endpoint is back.
    assert h.task_row(task_id)["status"] == "QUEUED"
    assert h.task_row(task_id)["attempt"] == 0
    dlq = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.stack.ref("TaskDeadLetterQueue"), AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    assert dlq["ApproximateNumberOfMessages"] == "0"
    h.image_servers[0].knobs.healthy = True
    h.run_checker()
    h.drain()
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def test_retryable_failure_is_retried_on_the_other_endpoint(make_stack, alice):
    # Round-robin: whichever way the endpoint ids sort, one task tries the failing one first.
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0), ImageServerKnobs()],
        parameters={"DispatchStrategy": "round-robin"},
    )
    failing, healthy = h.image_servers
    h.run_checker()
    ids = [h.submit(alice, {"prompt": f"task {i}"}).json()["task_id"] for i in range(2)]
    h.drain()

    tasks = [h.get_task(alice, i).json() for i in ids]
    assert [t["status"] for t in tasks] == ["DONE", "DONE"]
    retried = [t for t in tasks if t["attempt"] == 2]
    # Round-robin sends at least one task to the failing endpoint first...
    assert failing.stats()["calls"] == len(retried) >= 1
    # ...and the retry goes to the other one, never back to the endpoint that just failed.
    assert healthy.stats()["calls"] == 2
    assert sorted(_result_objects(h)) == sorted(f"results/{i}.png" for i in ids)


def test_a_redelivered_task_past_its_attempts_fails_without_another_gpu_call(make_stack, alice):
    # Given a task whose last allowed attempt was claimed by a worker that died (lease over)
    h = make_stack(parameters={"MaxAttempts": "2"})
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    store = TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))
    for _ in range(2):
        task = store.get(task_id)
        assert task is not None
        assert store.claim(task, lease_seconds=-1, now=time.time()) is not None
    assert h.task_row(task_id)["attempt"] == 2

    # When SQS delivers its message again
    assert h.deliver(h.receive()) == []

    # Then it ends FAILED, naming the attempts, and the GPU is not called a third time
    task_view = h.get_task(alice, task_id).json()
    assert task_view["status"] == "FAILED"
    assert task_view["attempt"] == 2
    assert "gave up after 2 attempts" in task_view["error"]
    assert h.image_servers[0].stats()["calls"] == 0
    assert _result_objects(h) == []


def test_attempts_exhausted_ends_failed_with_the_error(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(failure_rate=1.0)], parameters={"MaxAttempts": "3"})
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    h.drain()

    task = h.get_task(alice, task_id).json()
    assert task["status"] == "FAILED"
    assert task["attempt"] == 3
    assert "attempt 3" in task["error"]
    assert "HTTP 500" in task["error"]
    assert task["result_url"] is None
    assert h.image_servers[0].stats()["calls"] == 3
    assert _result_objects(h) == []


def test_endpoint_rejecting_the_request_fails_the_task_without_retry(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(failure_rate=1.0, fail_status=400)])
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    task = h.get_task(alice, task_id).json()
    assert task["status"] == "FAILED"
    assert "rejected the request: HTTP 400" in task["error"]
    assert h.image_servers[0].stats()["calls"] == 1


def _timed_out_task(make_stack, alice):
    """One task whose only attempt outlives a 1 s task timeout (the endpoint takes 5 s)."""
    h = make_stack(
        endpoints=[ImageServerKnobs(latency_s=5.0)],
        parameters={"MaxAttempts": "1"},
        env={"TASK_TIMEOUT_SECONDS": "1"},
    )
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    return h, task_id


def test_gpu_call_past_the_task_timeout_fails_with_a_timeout_error(make_stack, alice):
    h, task_id = _timed_out_task(make_stack, alice)
    task = h.get_task(alice, task_id).json()
    assert task["status"] == "FAILED"
    # cut at the task timeout (1 s), not at the endpoint's 5 s answer; the message
    # names the limit, so the check does not depend on this machine's load
    assert "timed out after 1s" in task["error"]
    assert h.image_servers[0].stats()["calls"] == 1


def test_a_timed_out_call_keeps_its_slot_until_the_lease_ends(make_stack, alice):
    # The GPU may still be generating after the client gave up: handing its slot to the
    # next task at once would put one call more on the endpoint than its capacity.
    h, task_id = _timed_out_task(make_stack, alice)
    assert "timed out" in h.get_task(alice, task_id).json()["error"]

    registry = EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))
    fleet = registry.fleet(TaskKind.IMAGE)
    [endpoint] = fleet.endpoints
    # Not given back at the timeout (a release removes the lease from the row): the lease
    # stands to its end, the timeout plus the dispatcher's margin from the slot's take.
    # (Asserted on the row, not on the clock: on a loaded machine the test may read it
    # after that end.)
    [lease] = fleet.leases[endpoint.endpoint_id]
    assert lease.task_id == task_id
    assert lease.leased_at is not None
    assert lease.lease_until - lease.leased_at >= 1 + SAFETY_MARGIN_SECONDS


def test_same_message_delivered_twice_makes_one_image_and_one_done(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    messages = h.receive()
    assert h.deliver(messages) == []
    assert h.deliver(messages) == []  # the duplicate: skipped, reported as success

    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    assert h.task_row(task_id)["attempt"] == 1
    assert h.image_servers[0].stats()["calls"] == 1
    assert _result_objects(h) == [f"results/{task_id}.png"]


def test_duplicate_delivered_while_the_first_is_running_waits_for_it(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=1.0)])
    server = h.image_servers[0]
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    messages = h.receive()
    first = threading.Thread(target=h.deliver, args=(messages,))
    first.start()
    wait_for(lambda: server.stats()["in_flight"] == 1, what="first GPU call in flight")

    # The duplicate finds a live lease: a delayed copy comes back after the lease would end
    # (in case the first worker dies), and no second GPU call is made.
    assert h.deliver(messages) == []
    first.join(timeout=10)
    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    assert server.stats()["calls"] == 1
    attrs = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.queue_url(), AttributeNames=["ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]
    assert attrs["ApproximateNumberOfMessagesDelayed"] == "1"


def test_task_whose_worker_died_is_reclaimed_after_its_lease(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    # A worker claimed it and died: its lease is already over.
    store = TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))
    task = store.get(task_id)
    assert task is not None
    assert store.claim(task, lease_seconds=-1, now=time.time()) is not None
    assert h.task_row(task_id)["status"] == "RUNNING"

    h.drain()
    task_view = h.get_task(alice, task_id).json()
    assert task_view["status"] == "DONE"
    assert task_view["attempt"] == 2


def test_message_for_a_missing_task_is_dropped(make_stack):
    h = make_stack()
    boto3.client("sqs").send_message(
        QueueUrl=h.queue_url(), MessageBody='{"task_id": "does-not-exist", "kind": "image"}'
    )
    assert h.deliver(h.receive()) == []
    assert h.image_servers[0].stats()["calls"] == 0


def test_one_bad_record_does_not_fail_the_rest_of_the_batch(make_stack, alice):
    h = make_stack()
    h.run_checker()
    sqs = boto3.client("sqs")
    sqs.send_message(QueueUrl=h.queue_url(), MessageBody="not json")
    task_id = h.submit(alice).json()["task_id"]
    messages = h.receive(max_messages=10)
    while len(messages) < 2:
        messages += h.receive(max_messages=10)
    bad = next(m for m in messages if m["Body"] == "not json")
    assert h.deliver(messages) == [bad["MessageId"]]
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def test_image_params_survive_the_round_trip_through_the_table(make_stack):
    # Guards the item shape the dispatcher reads: params survive a round trip as numbers.
    h = make_stack()
    store = TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))
    created = store.create_image_task(
        "owner", ImageRequest(prompt="p", width=256, seed=7), queue_ttl_seconds=3600
    )
    loaded = store.get(created.task_id)
    assert loaded is not None
    assert loaded.params.width == 256
    assert loaded.params.seed == 7


def test_a_failed_slot_release_keeps_the_finished_image(make_stack, alice, monkeypatch):
    # The release write is refused (throttled, say) after the GPU answered: the image is still
    # stored and the task DONE; the slot comes back when its lease lapses.
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]

    def throttled(self, lease, *, call_seconds=None):
        raise StoreError(
            "endpoints table",
            ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "rate exceeded"}}, "UpdateItem"
            ),
        )

    monkeypatch.setattr(EndpointRegistry, "release_slot", throttled)
    assert h.deliver(h.receive()) == []

    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    assert _result_objects(h) == [f"results/{task_id}.png"]
    assert h.image_servers[0].stats()["calls"] == 1


def test_a_stale_worker_never_replaces_the_image_of_a_done_task(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    s3 = boto3.client("s3")
    bucket = h.stack.ref("ImagesBucket")
    first = s3.get_object(Bucket=bucket, Key=f"results/{task_id}.png")["Body"].read()

    # A worker whose lease was taken over finishes its own call later and stores its image.
    with h.acting_as("DispatcherFunction"):
        key = ImageStore(boto3.client("s3"), bucket).put_png(task_id, b"\x89PNG another image")

    assert key == f"results/{task_id}.png"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == first
