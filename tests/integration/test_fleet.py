"""The GPU fleet: slots as capacity, circuits, drain, strategies, protocols."""

from __future__ import annotations

import threading
import time

import boto3

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.models import CircuitState, EndpointProtocol, EndpointState, TaskKind
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import ONE_USER_MAY_FILL_THE_QUEUE, wait_for


def _registry(h) -> EndpointRegistry:
    return EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))


def _endpoint(h, server):
    return next(e for e in _registry(h).endpoints(TaskKind.IMAGE) if e.url == server.url)


def _set(h, server, **changes):
    registry = _registry(h)
    return registry.put(_endpoint(h, server).model_copy(update=changes))


def _deliver_concurrently(h, count: int) -> None:
    """`count` dispatcher invocations at once, as an ESM with that much concurrency would."""
    batches = []
    while len(batches) < count:
        batches.extend([m] for m in h.receive(max_messages=10))
    threads = [threading.Thread(target=h.deliver, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def test_an_endpoint_never_gets_more_calls_than_its_capacity(make_stack, alice):
    # Calls long enough that the concurrent deliveries overlap even on a loaded machine.
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=1.0)])
    server = h.image_servers[0]
    h.run_checker()
    _set(h, server, capacity=2)
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(5)]

    _deliver_concurrently(h, 5)
    h.drain()

    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 5
    assert server.stats()["max_in_flight"] == 2
    assert server.stats()["calls"] == 5


def test_a_slot_taken_by_a_crashed_worker_frees_itself_when_its_lease_ends(make_stack, alice):
    h = make_stack(env={"SLOT_WAIT_SECONDS": "0"})
    server = h.image_servers[0]
    h.run_checker()
    endpoint = _endpoint(h, server)
    # A dispatcher took the only slot and died without releasing it.
    # Long enough that a loaded machine still delivers before it ends (1.5 s was not).
    assert _registry(h).take_slot(endpoint, 0, task_id="ghost", lease_seconds=5, now=time.time())
    task_id = h.submit(alice).json()["task_id"]

    h.deliver(h.receive())
    row = h.task_row(task_id)
    assert (row["status"], row["attempt"]) == ("QUEUED", 0)  # waited, no attempt spent
    assert server.stats()["calls"] == 0

    wait_for(
        lambda: (
            _registry(h).fleet(TaskKind.IMAGE).in_flight(endpoint.endpoint_id, time.time()) == 0
        ),
        timeout=20,
        what="the crashed lease to end",
    )
    h.drain()
    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    assert server.stats()["calls"] == 1


def test_failing_endpoint_opens_its_circuit_and_gets_no_more_work(make_stack, alice):
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0), ImageServerKnobs()],
        parameters={
            **ONE_USER_MAY_FILL_THE_QUEUE,
            "DispatchStrategy": "round-robin",
            "CircuitFailureThreshold": "3",
        },
    )
    failing, healthy = h.image_servers
    h.run_checker()
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(8)]
    h.drain()

    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 8
    assert failing.stats()["calls"] == 3  # then the circuit opened
    row = _endpoint(h, failing)
    assert row.circuit is CircuitState.OPEN
    assert row.opened_at is not None
    assert healthy.stats()["calls"] == 8


def test_open_circuit_half_opens_on_a_good_check_and_closes_on_a_good_call(make_stack, alice):
    h = make_stack(
        endpoints=[ImageServerKnobs(failure_rate=1.0)],
        parameters={"CircuitFailureThreshold": "2", "MaxAttempts": "2"},
    )
    server = h.image_servers[0]
    h.run_checker()
    first = h.submit(alice).json()["task_id"]
    h.drain()
    assert h.get_task(alice, first).json()["status"] == "FAILED"
    assert _endpoint(h, server).circuit is CircuitState.OPEN

    # While open, nothing is sent.
    waiting = h.submit(alice).json()["task_id"]
    h.deliver(h.receive())
    assert server.stats()["calls"] == 2
    assert h.task_row(waiting)["status"] == "QUEUED"

    # The endpoint recovers: the checker half-opens it, one good call closes it.
    server.knobs.failure_rate = 0.0
    h.run_checker()
    assert _endpoint(h, server).circuit is CircuitState.HALF_OPEN
    h.drain()
    assert h.get_task(alice, waiting).json()["status"] == "DONE"
    assert _endpoint(h, server).circuit is CircuitState.CLOSED


def test_killed_endpoint_is_abandoned_at_once_and_every_task_still_finishes(make_stack, alice):
    h = make_stack(
        endpoints=[ImageServerKnobs(latency_s=0.05), ImageServerKnobs(latency_s=0.05)],
        parameters={
            **ONE_USER_MAY_FILL_THE_QUEUE,
            "DispatchStrategy": "round-robin",
            "CallsPerWorker": "1",
        },
    )
    victim, survivor = h.image_servers
    h.run_checker()
    victim.stop()  # dies between health checks: the table still says healthy
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(10)]
    invocations = h.drain()

    assert [h.get_task(alice, i).json()["status"] for i in ids] == ["DONE"] * 10
    # At once: each task finished in the invocation that first took it (a connect error
    # moves it to the survivor there and then); none went back to wait out a backoff.
    assert invocations == 10
    assert _endpoint(h, victim).circuit is CircuitState.OPEN
    assert survivor.stats()["calls"] == 10


def test_drained_endpoint_finishes_in_flight_work_and_gets_nothing_new(make_stack, alice):
    h = make_stack(
        endpoints=[ImageServerKnobs(latency_s=1.0), ImageServerKnobs()],
        parameters={"DispatchStrategy": "round-robin"},
    )
    draining, other = h.image_servers
    h.run_checker()
    _set(h, other, state=EndpointState.DISABLED)  # so the first task surely lands on `draining`
    first = h.submit(alice).json()["task_id"]
    worker = threading.Thread(target=h.deliver, args=(h.receive(),))
    worker.start()
    wait_for(lambda: draining.stats()["in_flight"] == 1, what="the call in flight")

    _registry(h).set_state(_endpoint(h, draining).endpoint_id, EndpointState.DRAINING)
    _set(h, other, state=EndpointState.ACTIVE)
    worker.join(timeout=10)
    later = [h.submit(alice, {"prompt": f"later {i}"}).json()["task_id"] for i in range(3)]
    h.drain()

    assert h.get_task(alice, first).json()["status"] == "DONE"
    assert [h.get_task(alice, i).json()["status"] for i in later] == ["DONE"] * 3
    assert draining.stats()["calls"] == 1
    assert other.stats()["calls"] == 3


def test_user_hash_keeps_each_user_on_one_endpoint(make_stack, alice, bob):
    h = make_stack(
        endpoints=[ImageServerKnobs(), ImageServerKnobs(), ImageServerKnobs()],
        parameters={"DispatchStrategy": "user-hash"},
    )
    h.run_checker()
    mine = [h.submit(alice, {"prompt": f"a{i}"}).json()["task_id"] for i in range(4)]
    theirs = [h.submit(bob, {"prompt": f"b{i}"}).json()["task_id"] for i in range(4)]
    h.drain()

    assert len({h.task_row(i)["endpoint_id"] for i in mine}) == 1
    assert len({h.task_row(i)["endpoint_id"] for i in theirs}) == 1
    assert all(h.task_row(i)["status"] == "DONE" for i in mine + theirs)


def test_a1111_endpoint_is_called_with_its_own_protocol(make_stack, alice):
    h = make_stack()
    server = h.image_servers[0]
    h.run_checker()
    _set(h, server, protocol=EndpointProtocol.A1111)
    task_id = h.submit(alice, {"prompt": "a1111 fox", "width": 192, "height": 128}).json()[
        "task_id"
    ]
    h.drain()
    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    assert server.stats()["prompts"] == ["a1111 fox"]
    assert _endpoint(h, server).protocol is EndpointProtocol.A1111


def test_checker_keeps_admin_added_rows_next_to_declared_ones(make_stack):
    h = make_stack(endpoints=[ImageServerKnobs(), ImageServerKnobs()])
    _declared, extra = h.image_servers
    h.run_checker()
    registry = _registry(h)
    row = _endpoint(h, extra)
    registry.delete(row.endpoint_id)
    registry.put(row.model_copy(update={"endpoint_id": "gpu-extra", "source": "admin"}))
    assert h.run_checker()["checked"] == 3  # the declared two and the admin one
    admin_row = registry.get("gpu-extra")
    assert admin_row is not None
    assert admin_row.healthy
    assert admin_row.latency_ewma_ms is not None


# --- measured call times and the tail of a burst (least-loaded) ------------------------------


def _seed_call_time(h, server, seconds: float) -> None:
    """Record one measured call on the endpoint's slot 0, as a finished dispatch would."""
    registry = _registry(h)
    lease = registry.take_slot(
        _endpoint(h, server), 0, task_id="seed", lease_seconds=5, now=time.time()
    )
    assert lease is not None
    registry.release_slot(lease, call_seconds=seconds)


def test_a_finished_call_teaches_the_fleet_the_endpoints_speed(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=0.3)])
    server = h.image_servers[0]
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]

    started = time.monotonic()
    h.drain()
    drained_in = time.monotonic() - started

    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    measured = _registry(h).fleet(TaskKind.IMAGE).service_seconds(_endpoint(h, server))
    assert measured is not None
    # The stand-in's 0.3 s at least; never more than the drain that made the one call.
    assert 0.3 <= measured <= drained_in


def _fast_and_slow(make_stack):
    """A fast endpoint (0.2 s calls) and a slow one (3 s), one slot each, speeds measured;
    one call per invocation, so each test follows one worker's choices."""
    h = make_stack(
        parameters=ONE_USER_MAY_FILL_THE_QUEUE,
        endpoints=[ImageServerKnobs(latency_s=0.2), ImageServerKnobs(latency_s=3.0)],
        env={"CALLS_PER_WORKER": "1"},
    )
    fast, slow = h.image_servers
    h.run_checker()
    for server, seconds in ((fast, 0.2), (slow, 3.0)):
        _set(h, server, capacity=1)
        _seed_call_time(h, server, seconds)
    return h, fast, slow


def _hold(h, server, seconds: float) -> None:
    """Another task's call holds the endpoint's slot for `seconds` more."""
    assert _registry(h).take_slot(
        _endpoint(h, server), 0, task_id="other", lease_seconds=seconds, now=time.time()
    )


def test_the_last_task_waits_for_a_faster_endpoint_rather_than_take_a_slow_one(make_stack, alice):
    h, fast, slow = _fast_and_slow(make_stack)
    task_id = h.submit(alice).json()["task_id"]
    message = h.receive()
    _hold(h, fast, 0.5)

    h.deliver(message)

    # Waiting ~0.5 s for the fast slot beats 3 s on the slow endpoint.
    assert h.get_task(alice, task_id).json()["status"] == "DONE"
    assert (fast.stats()["calls"], slow.stats()["calls"]) == (1, 0)


def test_a_deep_queue_uses_the_slow_endpoint_too(make_stack, alice):
    h, fast, slow = _fast_and_slow(make_stack)
    # More tasks waiting than the fast endpoint can finish in one slow call (3 s / 0.2 s).
    for i in range(20):
        h.submit(alice, {"prompt": f"p{i}"})
    message = h.receive()
    _hold(h, fast, 0.5)

    h.deliver(message)

    # The slow endpoint's worker keeps its slot while more tasks wait than the fast slot
    # clears in one slow call (15), then leaves the rest to it: 19, 18, 17, 16 waiting -> 4
    # more calls; at 15 it gives the slot back.
    assert (fast.stats()["calls"], slow.stats()["calls"]) == (0, 5)
    visible = boto3.client("sqs").get_queue_attributes(
        QueueUrl=h.queue_url(), AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]["ApproximateNumberOfMessages"]
    assert visible == "15"
