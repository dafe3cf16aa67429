"""The dispatcher's claim and attempt logic, and the slot leases it holds, on the tasks and
endpoints tables alone (built from template.yaml): no stack, no GPU server, a scripted job.

Fast on purpose: `make mutate` runs these against every mutant of dispatch.py and of the lease
parts of endpoint_registry.py (docs/mutation.md); tests/integration/test_dispatcher.py drives
the same through the handlers, the queue and stand-in GPU servers."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from gpuqueue.dispatch.dispatcher import DispatchOutcome, DispatchPolicy, Pulled, TaskDispatcher
from gpuqueue.dispatch.jobs import Completion, InvalidTaskInput
from gpuqueue.errors import GpuCanceled, GpuError, RetryableGpuError, RetryLater
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.slot_broker import LEASE_TAIL_SECONDS
from gpuqueue.models import (
    CircuitState,
    Endpoint,
    EndpointProtocol,
    HealthResult,
    ImageRequest,
    Priority,
    QueueMessage,
    Task,
    TaskKind,
    TaskStatus,
)
from gpuqueue.store.task_store import TaskStore

TIMEOUT = 10.0
PLENTY = 900.0  # seconds left in the invocation: room for several full calls


@pytest.fixture
def tables(template_table: Callable[[str], Any]) -> tuple[Any, Any]:
    return template_table("TasksTable"), template_table("EndpointsTable")


@pytest.fixture
def store(tables: tuple[Any, Any]) -> TaskStore:
    return TaskStore(tables[0])


@pytest.fixture
def registry(tables: tuple[Any, Any]) -> EndpointRegistry:
    return EndpointRegistry(tables[1])


def healthy(
    registry: EndpointRegistry,
    *endpoint_ids: str,
    protocol: EndpointProtocol = EndpointProtocol.OPENAI,
) -> None:
    for endpoint_id in endpoint_ids:
        added = registry.put(
            Endpoint(
                endpoint_id=endpoint_id,
                url=f"http://{endpoint_id}",
                kind=TaskKind.IMAGE,
                protocol=protocol,
            )
        )
        registry.record_health(
            HealthResult(
                endpoint_id=endpoint_id, healthy=True, latency_ms=5.0, checked_at=time.time()
            ),
            added,
        )


class ScriptedJob:
    """Each call takes the next outcome: an exception to raise, or the output."""

    checks_input_first = False

    def __init__(
        self,
        *outcomes: Any,
        registry: EndpointRegistry | None = None,
        rows: TaskStore | None = None,
    ) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, int, float]] = []
        self.in_flight_seen: list[int] = []
        self._registry = registry
        # With `rows`: the task's row as a reader saw it during each call.
        self._rows = rows
        self.rows_seen: list[tuple[TaskStatus, str | None, str | None, int]] = []
        self.prepared: list[str] = []  # each input handed out, once
        self.released: list[Any] = []  # each input let go
        self.inputs_run: list[Any] = []  # the input each call was given
        self.stored: list[tuple[str, Any]] = []  # (task id, output) for each stored result

    def prepare(self, task: Task) -> Any:
        if task.prompt == "unusable":
            raise InvalidTaskInput("the input is gone")
        job_input = f"input {len(self.prepared)} of {task.task_id}"
        self.prepared.append(job_input)
        return job_input

    def release(self, job_input: Any) -> None:
        self.released.append(job_input)

    def also(self, *outcomes: Any) -> ScriptedJob:
        """The same job with more outcomes to give."""
        self.outcomes += outcomes
        return self

    def released_all(self, count: int) -> bool:
        """`count` inputs prepared, and each of them (not another) released exactly once."""
        return len(self.prepared) == count and sorted(self.released) == sorted(self.prepared)

    def run(
        self, endpoint: Endpoint, task: Task, job_input: Any, *, timeout_seconds: float, **_: Any
    ) -> Any:
        self.calls.append((endpoint.endpoint_id, task.attempt, timeout_seconds))
        self.inputs_run.append(job_input)
        if self._registry is not None:
            fleet = self._registry.fleet(TaskKind.IMAGE)
            self.in_flight_seen.append(fleet.in_flight(endpoint.endpoint_id, time.time()))
        if self._rows is not None:
            row = self._rows.get(task.task_id)
            assert row is not None
            self.rows_seen.append((row.status, row.endpoint_id, row.error, row.attempt))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def store(self, task: Task, output: Any) -> Completion:
        self.stored.append((task.task_id, output))
        # An extra attribute for the row, as the speech job's transcript preview is.
        return Completion(
            result_key=f"results/{task.task_id}.png", fields={"transcript_text": f"of {output!r}"}
        )


class Observed:
    """The dispatcher's observer (its metrics), recording what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def task_started(self, task: Task, *, at: float) -> None:
        self.events.append(("started", task.task_id, task.attempt, task.status, at))

    def gpu_call_failed(self, task: Task, *, endpoint_id: str, retryable: bool) -> None:
        self.events.append(("failed", task.task_id, endpoint_id, retryable))

    def task_done(self, task: Task, *, call_seconds: float, at: float) -> None:
        self.events.append(("done", task.task_id, call_seconds, at))


class SteppingClock:
    """A clock that moves one second at every reading, from now."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def dispatcher(
    store: TaskStore,
    registry: EndpointRegistry,
    job: ScriptedJob,
    *,
    clock: Callable[[], float] = time.time,
    observer: Observed | None = None,
    **policy: Any,
) -> TaskDispatcher:
    return TaskDispatcher(
        tasks=store,
        registry=registry,
        jobs={TaskKind.IMAGE: job},
        policy=DispatchPolicy(
            **{
                "task_timeout_seconds": TIMEOUT,
                "max_attempts": 2,
                "health_max_age_seconds": 90,
                "slot_wait_seconds": 0,
                **policy,
            }
        ),
        clock=clock,
        sleep=lambda seconds: None,
        rng=random.Random(7),
        observer=observer,
    )


def submitted(store: TaskStore, prompt: str = "a fox", **request: Any) -> Task:
    return store.create_image_task(
        "alice", ImageRequest(prompt=prompt, **request), queue_ttl_seconds=3600
    )


def dispatch(d: TaskDispatcher, task: Task, *, left: float = PLENTY) -> DispatchOutcome:
    return d.dispatch(QueueMessage(task_id=task.task_id), remaining_seconds=lambda: left)


def in_flight(registry: EndpointRegistry, endpoint_id: str) -> int:
    return registry.fleet(TaskKind.IMAGE).in_flight(endpoint_id, time.time())


def test_a_task_runs_in_a_slot_and_ends_done_with_the_slot_free_again(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob(b"png", registry=registry, rows=store)
    task = submitted(store)

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.DONE

    assert job.calls == [("gpu-a", 1, TIMEOUT)]
    assert job.in_flight_seen == [1]  # the call held the endpoint's one slot
    # While it ran, a reader saw the task RUNNING on gpu-a (the reaper names it if lost).
    assert job.rows_seen == [(TaskStatus.RUNNING, "gpu-a", None, 1)]
    # The call got the prepared input; its output was stored, with the job's own fields.
    assert job.inputs_run == job.prepared
    assert job.stored == [(task.task_id, b"png")]
    # The call's time went into the slot's average as the slot went back.
    assert "gpu-a" in registry.fleet(TaskKind.IMAGE).call_seconds
    assert in_flight(registry, "gpu-a") == 0
    done = store.get(task.task_id)
    assert done is not None
    assert done.status is TaskStatus.DONE
    assert done.result_key == f"results/{task.task_id}.png"
    assert done.endpoint_id == "gpu-a"
    assert done.attempt == 1
    assert done.transcript_text == "of b'png'"


def test_the_call_gets_at_most_what_is_left_of_the_invocation(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob(b"png")

    dispatch(dispatcher(store, registry, job), submitted(store), left=8.0)

    assert job.calls == [("gpu-a", 1, 3.0)]  # 8 s left less the 5 s kept for the writes
    # With exactly the shortest call left (1 s), it still runs.
    dispatch(dispatcher(store, registry, job.also(b"png")), submitted(store), left=6.0)
    assert job.calls[1] == ("gpu-a", 1, 1.0)


def test_without_time_for_a_call_the_task_is_not_claimed(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob()
    task = submitted(store)

    with pytest.raises(RetryLater) as raised:
        dispatch(dispatcher(store, registry, job), task, left=5.9)

    assert raised.value.delay_seconds == 0
    assert job.calls == []
    assert store.get(task.task_id).attempt == 0  # type: ignore[union-attr]


class StallingClaims(TaskStore):
    """A task store whose claim stalls the clock by `stall` seconds (a worker descheduled, a
    slow control plane): the slot's lease, set before it, has that much less left."""

    def __init__(self, table: Any, stall: float, *, frozen: bool = False) -> None:
        super().__init__(table)
        self.stall = stall
        self.offset = 0.0
        # frozen: time moves only by the stall (from a whole second), so windows are exact.
        self._frozen_at = float(int(time.time())) if frozen else None

    def clock(self) -> float:
        base = time.time() if self._frozen_at is None else self._frozen_at
        return base + self.offset

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        claimed = super().claim(*args, **kwargs)
        self.offset += self.stall
        return claimed


def test_a_call_after_a_slow_claim_still_ends_inside_its_slots_lease(
    tables: tuple[Any, Any], registry: EndpointRegistry
) -> None:
    """A call outliving its slot's lease would share the GPU with the next lease's call."""
    store = StallingClaims(tables[0], stall=7.0)
    healthy(registry, "gpu-a")
    job = ScriptedJob(b"png")
    task = submitted(store)
    d = dispatcher(store, registry, job, clock=store.clock)

    assert dispatch(d, task) is DispatchOutcome.DONE

    # Leased for 10 + 5 s; 7 s gone claiming; half a second kept back: 7.5 s, not 10 (less
    # the real time the writes took: up to 0.3 s seen on a loaded machine, so 1 s allowed).
    ((_, _, timeout),) = job.calls
    assert 6.5 < timeout <= 15.0 - 7.0 - LEASE_TAIL_SECONDS


def test_a_claim_that_stalls_past_most_of_the_lease_gives_the_task_back_uncalled(
    tables: tuple[Any, Any], registry: EndpointRegistry
) -> None:
    store = StallingClaims(tables[0], stall=14.0)
    healthy(registry, "gpu-a")
    job = ScriptedJob()
    task = submitted(store)
    d = dispatcher(store, registry, job, clock=store.clock)

    with pytest.raises(RetryLater) as raised:
        dispatch(d, task)

    assert raised.value.delay_seconds == 0
    assert str(raised.value) == "the slot's lease ran short before the call"
    assert job.calls == []
    again = store.get(task.task_id)
    assert again is not None
    assert again.status is TaskStatus.QUEUED
    assert again.error == "the call could not start within its slot's lease"
    assert in_flight(registry, "gpu-a") == 0


def test_the_observer_hears_each_start_failure_and_done_as_of_the_dispatchers_clock(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(RetryableGpuError("HTTP 503"), b"png")
    task = submitted(store)
    seen = Observed()
    clock = SteppingClock()

    assert dispatch(dispatcher(store, registry, job, clock=clock, observer=seen), task) is (
        DispatchOutcome.DONE
    )

    first, second = (call[0] for call in job.calls)
    started_1, failed, started_2, done = seen.events
    assert started_1[:4] == ("started", task.task_id, 1, TaskStatus.RUNNING)
    assert failed == ("failed", task.task_id, first, True)
    assert started_2[:4] == ("started", task.task_id, 2, TaskStatus.RUNNING)
    assert done[:2] == ("done", task.task_id)
    # Each as of the dispatcher's clock, in order; the good call took whole clock steps.
    assert started_1[4] < started_2[4] < done[3] <= clock.now
    assert done[2] >= 1.0
    assert second != first


def test_a_call_whose_leases_leave_exactly_the_shortest_call_still_runs(
    tables: tuple[Any, Any], registry: EndpointRegistry
) -> None:
    # Leased for 10 + 5 s; 13.5 s gone claiming; half a second kept back: 1 s, the minimum.
    store = StallingClaims(tables[0], stall=13.5, frozen=True)
    healthy(registry, "gpu-a")
    job = ScriptedJob(b"png")

    assert dispatch(dispatcher(store, registry, job, clock=store.clock), submitted(store)) is (
        DispatchOutcome.DONE
    )
    assert job.calls == [("gpu-a", 1, 1.0)]


def test_a_failed_call_is_counted_against_its_endpoint_and_can_open_its_circuit(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(RetryableGpuError("HTTP 503"), b"png")
    clock = SteppingClock()
    d = dispatcher(store, registry, job, clock=clock, circuit_failure_threshold=1)

    assert dispatch(d, submitted(store)) is DispatchOutcome.DONE

    failed_on, done_on = (call[0] for call in job.calls)
    failed = registry.get(failed_on)
    assert failed is not None
    assert (failed.consecutive_failures, failed.circuit) == (1, CircuitState.OPEN)
    assert failed.opened_at is not None
    assert clock.now - 10 < failed.opened_at <= clock.now  # as of the dispatcher's clock
    healthy_one = registry.get(done_on)
    assert healthy_one is not None
    assert (healthy_one.consecutive_failures, healthy_one.circuit) == (0, CircuitState.CLOSED)


def test_with_exactly_a_full_call_left_after_a_failure_the_retry_runs_here(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(RetryableGpuError("HTTP 503"), b"png")
    readings = iter([16.0])

    def remaining() -> float:
        # 16 s at the start; then exactly one call (10 s) and its margin (5 s) left.
        return next(readings, 15.0)

    task = submitted(store)
    outcome = dispatcher(store, registry, job).dispatch(
        QueueMessage(task_id=task.task_id), remaining_seconds=remaining
    )

    assert outcome is DispatchOutcome.DONE
    assert [call[1] for call in job.calls] == [1, 2]


def test_a_retry_with_too_little_time_left_goes_back_queued_with_its_last_error(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(RetryableGpuError("HTTP 503"))
    # 16 s at the start; 15 s after the failure (a retry fits); then a stall: 5.5 s.
    readings = iter([16.0, 15.0])

    task = submitted(store)
    with pytest.raises(RetryLater) as raised:
        dispatcher(store, registry, job).dispatch(
            QueueMessage(task_id=task.task_id), remaining_seconds=lambda: next(readings, 5.5)
        )

    assert str(raised.value) == "not enough time left in this invocation"
    assert raised.value.delay_seconds == 0
    again = store.get(task.task_id)
    assert again is not None
    failed_on = job.calls[0][0]
    assert (again.status, again.attempt, again.error) == (
        TaskStatus.QUEUED,
        1,
        f"attempt 1 on {failed_on}: HTTP 503",
    )
    assert in_flight(registry, "gpu-a") == in_flight(registry, "gpu-b") == 0


def test_a_high_priority_task_runs_on_a_seat_of_the_lane(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    seats_free: list[list[int]] = []
    job = ScriptedJob(b"png")
    run = job.run

    def run_watching_the_lane(*args: Any, **kwargs: Any) -> Any:
        seats_free.append(registry.fleet(TaskKind.IMAGE).free_priority_seats(time.time(), 1))
        return run(*args, **kwargs)

    job.run = run_watching_the_lane  # type: ignore[method-assign]
    vip = submitted(store, priority="high")

    assert (
        dispatch(dispatcher(store, registry, job, priority_lane_slots=1), vip)
        is DispatchOutcome.DONE
    )
    assert seats_free == [[]]  # the lane's one seat was the call's
    assert registry.fleet(TaskKind.IMAGE).free_priority_seats(time.time(), 1) == [0]


def test_a_retryable_failure_moves_on_to_another_endpoint_in_the_same_invocation(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(RetryableGpuError("HTTP 503"), b"png", rows=store)
    task = submitted(store)

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.DONE

    first, second = job.calls
    # The second attempt's row names its endpoint and the first attempt's failure.
    assert job.rows_seen == [
        (TaskStatus.RUNNING, first[0], None, 1),
        (TaskStatus.RUNNING, second[0], f"attempt 1 on {first[0]}: HTTP 503", 2),
    ]
    assert first[1:] == (1, TIMEOUT)
    assert second[1:] == (2, TIMEOUT)
    assert second[0] != first[0]  # the other endpoint
    done = store.get(task.task_id)
    assert done is not None
    assert done.status is TaskStatus.DONE
    assert done.attempt == 2
    assert done.error is None
    assert in_flight(registry, "gpu-a") == in_flight(registry, "gpu-b") == 0


def test_the_last_attempt_failing_ends_the_task_failed_naming_the_attempt(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(RetryableGpuError("HTTP 503"), RetryableGpuError("HTTP 502"))
    task = submitted(store)

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.FAILED

    assert len(job.calls) == 2
    failed = store.get(task.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.attempt == 2
    assert failed.error == f"attempt 2 on {job.calls[1][0]}: HTTP 502"


def test_a_permanent_failure_ends_the_task_at_once(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(GpuError("HTTP 400: bad prompt"))
    task = submitted(store)

    assert (
        dispatch(dispatcher(store, registry, job, max_attempts=5), task) is DispatchOutcome.FAILED
    )

    assert len(job.calls) == 1
    called = job.calls[0][0]
    failed = store.get(task.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == f"attempt 1 on {called}: HTTP 400: bad prompt"
    assert failed.endpoint_id == called
    assert in_flight(registry, called) == 0  # the slot given back with the task ended


def test_without_time_for_another_full_call_the_task_is_queued_again_after_a_backoff(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    job = ScriptedJob(RetryableGpuError("timeout"))
    task = submitted(store)
    # 16 s left at the start: a full call fits; 14 s after it failed: another does not.
    remaining = iter([16.0, 14.0])
    d = dispatcher(store, registry, job, retry_base_delay_seconds=4, retry_max_delay_seconds=60)
    with pytest.raises(RetryLater) as raised:
        d.dispatch(QueueMessage(task_id=task.task_id), remaining_seconds=lambda: next(remaining))

    assert 2 <= raised.value.delay_seconds <= 4  # attempt 1: jittered within [base/2, base]
    assert not raised.value.requeue
    called = job.calls[0][0]
    assert str(raised.value) == f"attempt 1 on {called}: timeout"
    again = store.get(task.task_id)
    assert again is not None
    assert again.status is TaskStatus.QUEUED
    assert again.attempt == 1
    assert again.error == f"attempt 1 on {called}: timeout"
    assert in_flight(registry, called) == 0


def test_a_task_whose_attempts_are_used_up_fails_without_a_gpu_call(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob()
    task = submitted(store)
    claim = store.claim(task, lease_seconds=1, now=time.time() - 60)
    assert claim is not None
    assert store.release_for_retry(claim, error="HTTP 503", endpoint_id="gpu-a")

    assert (
        dispatch(dispatcher(store, registry, job, max_attempts=1), task) is DispatchOutcome.FAILED
    )

    assert job.calls == []
    failed = store.get(task.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "gave up after 1 attempts; last error: HTTP 503"


def test_a_task_whose_worker_was_lost_on_its_last_attempt_fails_saying_so(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob()
    task = submitted(store)
    assert store.claim(task, lease_seconds=1, now=time.time() - 60) is not None  # lapsed

    assert (
        dispatch(dispatcher(store, registry, job, max_attempts=1), task) is DispatchOutcome.FAILED
    )

    failed = store.get(task.task_id)
    assert failed is not None
    assert failed.error == "gave up after 1 attempts; last error: the worker's lease expired"


def test_a_retry_that_finds_no_free_slot_goes_back_queued_with_its_last_error(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    gpu_b = next(e for e in registry.fleet(TaskKind.IMAGE).endpoints if e.endpoint_id == "gpu-b")
    assert registry.take_slot(gpu_b, 0, task_id="other", lease_seconds=60, now=time.time())
    job = ScriptedJob(RetryableGpuError("HTTP 503"))  # on gpu-a, the only free slot
    task = submitted(store)

    with pytest.raises(RetryLater) as raised:
        dispatch(dispatcher(store, registry, job), task)

    assert raised.value.requeue
    again = store.get(task.task_id)
    assert again is not None
    assert (again.status, again.attempt, again.error, again.endpoint_id) == (
        TaskStatus.QUEUED,
        1,
        "attempt 1 on gpu-a: HTTP 503",
        "gpu-a",
    )
    assert in_flight(registry, "gpu-a") == 0


def test_a_task_with_attempts_left_after_a_failure_is_claimed_again(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    task = submitted(store)
    claim = store.claim(task, lease_seconds=30, now=time.time(), endpoint_id="gpu-a")
    assert claim is not None
    assert store.release_for_retry(claim, error="HTTP 503", endpoint_id="gpu-a")
    job = ScriptedJob(b"png")

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.DONE

    assert job.calls == [("gpu-b", 2, TIMEOUT)]  # not back to the endpoint that failed it


def test_a_live_lease_sends_the_message_back_until_it_would_end(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    task = submitted(store)
    now = float(int(time.time()))
    assert store.claim(task, lease_seconds=30, now=now) is not None
    job = ScriptedJob()

    with pytest.raises(RetryLater) as raised:
        dispatch(dispatcher(store, registry, job, clock=lambda: now), task)

    assert raised.value.requeue
    assert raised.value.delay_seconds == 31  # the lease's 30 s, and a second past its end
    assert str(raised.value) == "task is running elsewhere"
    assert job.calls == []
    # At the very instant the lease ends it is still the holder's (as the claim's condition).
    with pytest.raises(RetryLater) as raised:
        dispatch(dispatcher(store, registry, job, clock=lambda: now + 30), task)
    assert raised.value.delay_seconds == 1


def test_an_expired_lease_is_claimed_again_by_a_redelivery(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    task = submitted(store)
    assert store.claim(task, lease_seconds=1, now=time.time() - 60) is not None
    job = ScriptedJob(b"png")

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.DONE
    assert job.calls == [("gpu-a", 2, TIMEOUT)]


def test_a_finished_or_missing_task_is_skipped(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob()
    canceled = submitted(store)
    store.cancel(canceled.task_id, "alice")
    d = dispatcher(store, registry, job)

    assert dispatch(d, canceled) is DispatchOutcome.SKIPPED
    missing = QueueMessage(task_id=str(uuid.uuid4()))
    assert d.dispatch(missing, remaining_seconds=lambda: PLENTY) is DispatchOutcome.SKIPPED
    assert job.calls == []


def test_a_task_past_its_queue_deadline_expires_without_a_gpu_call(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob()
    task = submitted(store, queue_ttl_seconds=1)
    d = TaskDispatcher(
        tasks=store,
        registry=registry,
        jobs={TaskKind.IMAGE: job},
        policy=DispatchPolicy(
            task_timeout_seconds=TIMEOUT, max_attempts=2, health_max_age_seconds=90
        ),
        clock=lambda: time.time() + 2,
    )

    assert dispatch(d, task) is DispatchOutcome.EXPIRED

    assert job.calls == []
    expired = store.get(task.task_id)
    # At its deadline exactly a task is still in time.
    on_time = submitted(store, queue_ttl_seconds=60)
    assert on_time.queue_deadline is not None
    deadline = on_time.queue_deadline
    assert (
        dispatch(dispatcher(store, registry, job.also(b"png"), clock=lambda: deadline), on_time)
        is DispatchOutcome.DONE
    )
    assert expired is not None
    assert expired.status is TaskStatus.EXPIRED
    assert expired.error == "not started within its queue deadline (1 s)"


def test_unusable_input_fails_the_task_without_a_gpu_call(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob()
    task = submitted(store, prompt="unusable")

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.FAILED

    assert job.calls == []
    assert store.get(task.task_id).error == "the input is gone"  # type: ignore[union-attr]


def test_no_healthy_endpoint_sends_the_message_back_without_spending_an_attempt(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    job = ScriptedJob()
    task = submitted(store)

    with pytest.raises(RetryLater) as raised:
        dispatch(dispatcher(store, registry, job, no_endpoint_delay_seconds=7), task)

    assert raised.value.requeue
    assert raised.value.delay_seconds == 7
    assert str(raised.value) == "no healthy image endpoint"
    assert store.get(task.task_id).attempt == 0  # type: ignore[union-attr]


def test_no_free_slot_sends_the_message_back_without_spending_an_attempt(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    gpu = registry.fleet(TaskKind.IMAGE).endpoints[0]
    assert registry.take_slot(gpu, 0, task_id="other", lease_seconds=60, now=time.time())
    job = ScriptedJob()
    task = submitted(store)

    with pytest.raises(RetryLater) as raised:
        dispatch(dispatcher(store, registry, job, no_slot_delay_seconds=3), task)

    assert raised.value.requeue
    assert raised.value.delay_seconds == 3
    assert str(raised.value) == "every image GPU slot is busy"
    assert store.get(task.task_id).attempt == 0  # type: ignore[union-attr]


# --- a kept slot: the worker takes its next tasks itself ---------------------------------


class Queue:
    """NextTasks over a list of tasks: what each settle saw of its task when it came."""

    def __init__(self, store: TaskStore, *tasks: Task) -> None:
        self._store = store
        self.waiting = [QueueMessage(task_id=t.task_id) for t in tasks]
        self.pulls = 0
        self.settled: list[tuple[str, Any, TaskStatus | None]] = []
        self.taken: set[str] = set()

    def pull(self) -> Pulled | None:
        self.pulls += 1
        if not self.waiting:
            return None
        message = self.waiting.pop(0)
        return Pulled(message=message, receipt=f"receipt-{message.task_id}")

    def settle(self, pulled: Pulled, result: DispatchOutcome | Exception) -> None:
        task = self._store.get(pulled.message.task_id)
        self.settled.append(
            (pulled.message.task_id, result, task.status if task is not None else None)
        )

    def take(self, task_id: str) -> bool:
        if task_id in self.taken:
            return False
        self.taken.add(task_id)
        return True

    def give_back(self, task_id: str) -> None:
        self.taken.discard(task_id)

    def expect(self, worker: object, at: float | None) -> None:
        pass  # one message a pull: nothing to batch


def serve(d: TaskDispatcher, first: Task, queue: Queue, *, left: float = PLENTY) -> DispatchOutcome:
    return d.dispatch(
        QueueMessage(task_id=first.task_id), remaining_seconds=lambda: left, next_tasks=queue
    )


class LeaseWatchingJob(ScriptedJob):
    """Also records the slot lease each call ran under."""

    def __init__(
        self, *outcomes: Any, registry: EndpointRegistry, rows: TaskStore | None = None
    ) -> None:
        super().__init__(*outcomes, registry=registry, rows=rows)
        self.leases: list[str] = []
        self._leases_of = registry

    def run(
        self, endpoint: Endpoint, task: Task, job_input: Any, *, timeout_seconds: float, **_: Any
    ) -> Any:
        fleet = self._leases_of.fleet(TaskKind.IMAGE)
        self.leases += [
            f"{lease.lease_id}:{lease.task_id}"
            for lease in fleet.live_leases(endpoint.endpoint_id, time.time())
        ]
        return super().run(endpoint, task, job_input, timeout_seconds=timeout_seconds)


def test_a_kept_slot_runs_the_next_tasks_each_settled_once_done(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second, third = (submitted(store) for _ in range(3))
    job = LeaseWatchingJob(b"1", b"2", b"3", registry=registry, rows=store)
    queue = Queue(store, second, third)
    seen = Observed()
    before = time.time()

    assert (
        serve(dispatcher(store, registry, job, observer=seen), first, queue) is DispatchOutcome.DONE
    )

    # Each call had the whole task timeout, pulled ones too, each task RUNNING on gpu-a.
    assert job.calls == [("gpu-a", 1, TIMEOUT)] * 3
    assert job.rows_seen == [(TaskStatus.RUNNING, "gpu-a", None, 1)] * 3
    starts = [e for e in seen.events if e[0] == "started"]
    assert [e[1:4] for e in starts] == [
        (t.task_id, 1, TaskStatus.RUNNING) for t in (first, second, third)
    ]
    assert before <= starts[0][4] <= starts[1][4] <= starts[2][4] <= time.time()
    assert job.in_flight_seen == [1, 1, 1]
    # One lease, kept across the tasks: the slot was never given back meanwhile. Renewed
    # for the second (the first hand-off says the slot is kept), and not for the third:
    # it covered that call, and readers reckon the calls right from the row.
    lease_ids = {entry.split(":")[0] for entry in job.leases}
    assert len(lease_ids) == 1
    assert [entry.split(":")[1] for entry in job.leases] == [
        first.task_id,
        second.task_id,
        second.task_id,
    ]
    # Settled only once DONE was written; the queue asked until it was empty.
    assert queue.settled == [
        (second.task_id, DispatchOutcome.DONE, TaskStatus.DONE),
        (third.task_id, DispatchOutcome.DONE, TaskStatus.DONE),
    ]
    assert queue.pulls == 3
    assert in_flight(registry, "gpu-a") == 0


class SuccessesHeard(EndpointRegistry):
    """Records the endpoint state each success was reported with (a success on an endpoint
    that shows no failures costs no write)."""

    def __init__(self, table: Any) -> None:
        super().__init__(table)
        self.successes: list[tuple[int, CircuitState]] = []

    def record_dispatch_success(self, endpoint: Endpoint) -> None:
        self.successes.append((endpoint.consecutive_failures, endpoint.circuit))
        super().record_dispatch_success(endpoint)


def test_after_a_good_call_a_kept_slot_knows_its_endpoint_healthy_and_writes_that_once(
    store: TaskStore, tables: tuple[Any, Any]
) -> None:
    registry = SuccessesHeard(tables[1])
    healthy(registry, "gpu-a")
    # On trial after a failure: one more good call closes its circuit.
    tables[1].update_item(
        Key={"endpoint_id": "gpu-a"},
        UpdateExpression="SET circuit = :trial, consecutive_failures = :one",
        ExpressionAttributeValues={":trial": CircuitState.HALF_OPEN.value, ":one": 1},
    )
    first, second, third = (submitted(store) for _ in range(3))
    queue = Queue(store, second, third)
    job = ScriptedJob(b"1", b"2", b"3")

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE

    # The first success resets the count (a write); the slot's copy of the endpoint then
    # says so, and the next successes on it need no write.
    # (Each is reported as its task is finished, beside the next call: in any order.)
    assert Counter(registry.successes) == {
        (1, CircuitState.HALF_OPEN): 1,
        (0, CircuitState.CLOSED): 2,
    }
    gpu_a = registry.get("gpu-a")
    assert gpu_a is not None
    assert (gpu_a.consecutive_failures, gpu_a.circuit) == (0, CircuitState.CLOSED)


def test_no_next_task_is_pulled_without_time_for_a_whole_call(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second = submitted(store), submitted(store)
    queue = Queue(store, second)

    # 14 s left: a 9 s call, then 14 - 5 < 10 s (a whole call) for another.
    serve(dispatcher(store, registry, ScriptedJob(b"1")), first, queue, left=TIMEOUT + 4)

    assert queue.pulls == 0
    assert store.get(second.task_id).status is TaskStatus.QUEUED  # type: ignore[union-attr]
    assert in_flight(registry, "gpu-a") == 0


def test_a_pulled_task_that_fails_for_good_is_settled_failed_and_the_slot_goes_on(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, bad, last = (submitted(store) for _ in range(3))
    job = ScriptedJob(b"1", GpuError("HTTP 400: bad size"), b"3")
    queue = Queue(store, bad, last)

    serve(dispatcher(store, registry, job), first, queue)

    assert queue.settled == [
        (bad.task_id, DispatchOutcome.FAILED, TaskStatus.FAILED),
        (last.task_id, DispatchOutcome.DONE, TaskStatus.DONE),
    ]


def test_a_pulled_task_running_elsewhere_is_sent_back_and_the_slot_given_back(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, busy, never = (submitted(store) for _ in range(3))
    assert store.claim(busy, lease_seconds=30, now=time.time()) is not None
    queue = Queue(store, busy, never)

    serve(dispatcher(store, registry, ScriptedJob(b"1")), first, queue)

    [(task_id, result, _)] = queue.settled
    assert task_id == busy.task_id
    assert isinstance(result, RetryLater)
    assert result.requeue
    assert queue.waiting == [QueueMessage(task_id=never.task_id)]  # left in the queue
    assert in_flight(registry, "gpu-a") == 0


def test_a_pulled_retry_goes_to_another_endpoint_than_the_one_that_failed_it(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    retry = submitted(store)
    claim = store.claim(retry, lease_seconds=30, now=time.time(), endpoint_id="gpu-a")
    assert claim is not None
    assert store.release_for_retry(claim, error="HTTP 503", endpoint_id="gpu-a")
    first = submitted(store)
    job = ScriptedJob(b"1", b"2")
    queue = Queue(store, retry)

    serve(dispatcher(store, registry, job), first, queue)

    assert job.calls[1][0] == "gpu-b"
    assert queue.settled == [(retry.task_id, DispatchOutcome.DONE, TaskStatus.DONE)]


def test_a_duplicate_of_a_task_this_worker_just_ran_is_skipped_not_sent_back(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    # The copy comes while the first run's DONE may still be being written beside the next
    # call: it is this worker's own task, not one "running elsewhere" to wait out.
    healthy(registry, "gpu-a")
    first = submitted(store)
    job = ScriptedJob(b"1")
    queue = Queue(store, first)

    serve(dispatcher(store, registry, job), first, queue)

    assert len(job.calls) == 1
    assert [(t, r) for t, r, _ in queue.settled] == [(first.task_id, DispatchOutcome.SKIPPED)]


# --- a prepared input is always released (a speech task's audio holds memory) -------------


def test_every_prepared_input_is_released_however_its_task_ends(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob(b"png", GpuError("HTTP 400"), RetryableGpuError("timeout"))
    d = dispatcher(store, registry, job)

    assert dispatch(d, submitted(store)) is DispatchOutcome.DONE
    assert dispatch(d, submitted(store)) is DispatchOutcome.FAILED
    with pytest.raises(RetryLater):  # no time for a second call: back to the queue
        dispatch(d, submitted(store), left=TIMEOUT + 4)
    registry.take_slot(  # the one slot held by another worker: no call at all
        registry.endpoints(TaskKind.IMAGE)[0], 0, task_id="other", lease_seconds=60, now=time.time()
    )
    with pytest.raises(RetryLater):
        dispatch(d, submitted(store))

    assert job.released_all(4)


def test_a_kept_slot_releases_each_pulled_input_and_prepares_memory_bound_ones_first(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    job = ScriptedJob(b"png", b"png", b"png")
    first, *rest = (submitted(store, f"p{i}") for i in range(3))
    queue = Queue(store, *rest)

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE
    assert [result for _, result, _ in queue.settled] == [
        DispatchOutcome.DONE,
        DispatchOutcome.DONE,
    ]
    assert job.released_all(3)

    # A job that checks its input first is never prepared onto a kept slot: it goes the
    # usual way (the slot given back, then taken again), so a missing input holds no slot.
    job = LeaseWatchingJob(b"png", b"png", registry=registry)
    job.checks_input_first = True  # type: ignore[misc]
    first, second = (submitted(store, f"q{i}") for i in range(2))
    queue = Queue(store, second)

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE
    assert [result for _, result, _ in queue.settled] == [DispatchOutcome.DONE]
    assert job.released_all(2)
    first_lease, second_lease = (entry.split(":")[0] for entry in job.leases)
    assert first_lease != second_lease  # a lease of its own, taken once it was prepared


def test_a_pulled_task_sent_back_is_not_taken_for_a_duplicate_when_its_copy_comes(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    # A worker group skips a message for a task one of its workers drives; a task that went
    # back to the queue is driven by no one here, so its copy must run, not be deleted.
    healthy(registry, "gpu-a")
    first, elsewhere = submitted(store, "p0"), submitted(store, "p1")
    assert store.claim(elsewhere, lease_seconds=60, now=time.time(), endpoint_id="gpu-b")
    queue = Queue(store, elsewhere)

    assert (
        serve(dispatcher(store, registry, ScriptedJob(b"png")), first, queue)
        is DispatchOutcome.DONE
    )

    [(task_id, result, _)] = queue.settled
    assert task_id == elsewhere.task_id
    assert isinstance(result, RetryLater)  # running elsewhere: back to the queue
    assert queue.take(elsewhere.task_id)  # its copy is not a duplicate
    assert not queue.take(first.task_id)  # the one this worker finished is


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


CALL_SECONDS = 1.2


class EarlyReceiveJob(ScriptedJob):
    """A call on a kept slot that waits (bounded) for the worker to receive its next message
    while the call still runs: what each call saw of the queue's receives by its end."""

    def __init__(self, *outcomes: Any, queue: Queue, registry: EndpointRegistry) -> None:
        super().__init__(*outcomes, registry=registry)
        self.queue = queue
        self.received_during: list[bool] = []
        self.at_call_end: Callable[[int], None] = lambda call: None

    def run(
        self, endpoint: Endpoint, task: Task, job_input: Any, *, timeout_seconds: float, **_: Any
    ) -> Any:
        started = time.monotonic()
        before = self.queue.pulls
        call = len(self.calls)
        try:
            return super().run(endpoint, task, job_input, timeout_seconds=timeout_seconds)
        finally:
            if call > 0:  # the first call on a new slot has no measured time to receive by
                self.received_during.append(_wait_for(lambda: self.queue.pulls > before))
            # The GPU's time: long enough to be worth receiving before it ends (> 1 s).
            time.sleep(max(0.0, CALL_SECONDS - (time.monotonic() - started)))
            self.at_call_end(call)


def test_a_kept_slot_receives_its_next_message_while_its_call_runs(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second, third = (submitted(store) for _ in range(3))
    queue = Queue(store, second, third)
    job = EarlyReceiveJob(b"1", b"2", b"3", queue=queue, registry=registry)

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE

    # The second and third calls each found their successor's receive done before they
    # ended (the third's found the queue empty): the hand-off did not wait on a receive.
    assert job.received_during == [True, True]
    assert queue.pulls == 3  # no receive twice for one hand-off
    assert [s[:2] for s in queue.settled] == [
        (second.task_id, DispatchOutcome.DONE),
        (third.task_id, DispatchOutcome.DONE),
    ]
    assert in_flight(registry, "gpu-a") == 0


def test_a_kept_slots_next_task_is_claimed_and_its_slot_renewed_while_the_call_before_runs(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second, third = (submitted(store) for _ in range(3))
    queue = Queue(store, second, third)
    job = EarlyReceiveJob(b"1", b"2", b"3", queue=queue, registry=registry)
    at_second_end: list[tuple[TaskStatus, bool, bool]] = []

    def look(call: int) -> None:
        if call == 1:  # the second task's call, ending: the third is already under way
            row = store.get(third.task_id)
            now = time.time()
            [lease] = registry.fleet(TaskKind.IMAGE).live_leases("gpu-a", now)
            covers = lease.lease_until - now > TIMEOUT  # a whole call from now
            at_second_end.append((row.status, lease.kept, covers))  # type: ignore[union-attr]

    job.at_call_end = look
    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE

    # The hand-off was made before the call ended: the third task claimed, the slot's lease
    # (kept across calls) covering its call. The next call starts at once, on the same slot.
    assert at_second_end == [(TaskStatus.RUNNING, True, True)]
    assert [c[:2] for c in job.calls] == [("gpu-a", 1)] * 3
    assert store.get(third.task_id).status is TaskStatus.DONE  # type: ignore[union-attr]
    assert in_flight(registry, "gpu-a") == 0


def test_a_task_claimed_ahead_goes_back_uncalled_when_the_slot_it_was_for_is_given_up(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", "gpu-b")
    first, second, third = (submitted(store) for _ in range(3))
    queue = Queue(store, second, third)
    # The second call fails and moves to the other endpoint, giving its slot up: the third
    # had been claimed for that slot.
    job = EarlyReceiveJob(
        b"1", RetryableGpuError("HTTP 503"), b"2", b"3", queue=queue, registry=registry
    )
    seen: list[TaskStatus] = []
    job.at_call_end = lambda call: seen.append(store.get(third.task_id).status)  # type: ignore[union-attr]

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE

    assert seen[1] is TaskStatus.RUNNING  # claimed ahead, as the second's first call ended
    failed_on, moved_to = job.calls[1][0], job.calls[2][0]
    assert failed_on != moved_to
    # Handed back QUEUED (its attempt counted) and claimed again for the slot the worker
    # kept: never called on the given-up slot under the claim made for it.
    assert job.calls[3][:2] == (moved_to, 2)
    done = store.get(third.task_id)
    assert done is not None
    assert done.status is TaskStatus.DONE
    assert done.endpoint_id == moved_to
    assert [t for t, _, _ in queue.settled].count(third.task_id) == 1
    assert in_flight(registry, "gpu-a") == in_flight(registry, "gpu-b") == 0


def test_a_message_received_early_goes_back_at_once_when_no_call_fits_after_all(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second, third = (submitted(store) for _ in range(3))
    queue = Queue(store, second, third)
    job = EarlyReceiveJob(b"1", b"2", queue=queue, registry=registry)
    left = [PLENTY]

    def invocation_runs_short(call: int) -> None:
        if call == 1:  # the third's message is in hand: now the invocation's time is short
            left[0] = TIMEOUT

    job.at_call_end = invocation_runs_short
    d = dispatcher(store, registry, job)
    d.dispatch(
        QueueMessage(task_id=first.task_id), remaining_seconds=lambda: left[0], next_tasks=queue
    )

    assert job.received_during == [True]
    [(result, status)] = [(r, st) for t, r, st in queue.settled if t == third.task_id]
    assert isinstance(result, RetryLater)
    assert result.delay_seconds == 0  # visible again at once, for another worker
    assert not result.requeue
    assert status is TaskStatus.QUEUED
    assert [c[1] for c in job.calls] == [1, 1]  # the third never reached a GPU here
    assert in_flight(registry, "gpu-a") == 0


def _lose_the_lease_during(job: ScriptedJob, registry: EndpointRegistry, task: Task) -> None:
    """The worker stalls past its slot's lease during `task`'s call: the slot is no longer its
    own when the call ends."""
    run_first = job.run

    def run(
        endpoint: Endpoint, ran: Task, job_input: Any, *, timeout_seconds: float, **_: Any
    ) -> Any:
        output = run_first(endpoint, ran, job_input, timeout_seconds=timeout_seconds)
        if ran.task_id == task.task_id:
            [lease] = registry.fleet(TaskKind.IMAGE).live_leases("gpu-a", time.time())
            registry.release_slot(lease)
        return output

    job.run = run  # type: ignore[method-assign]


def test_after_a_lost_lease_the_fresh_slot_is_kept_for_the_next_task_and_inputs_released(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second, third = (submitted(store) for _ in range(3))
    queue = Queue(store, second, third)
    job = ScriptedJob(b"1", b"2", b"3", registry=registry)
    _lose_the_lease_during(job, registry, first)

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE

    # The second ran as its next attempt on a slot leased afresh, which the worker kept
    # for the third (no third attempt, no other worker needed).
    assert [c[1] for c in job.calls] == [1, 2, 1]
    assert store.get(third.task_id).status is TaskStatus.DONE  # type: ignore[union-attr]
    assert job.released_all(3)  # every prepared input let go
    assert in_flight(registry, "gpu-a") == 0


def test_an_unusable_task_claimed_as_the_slots_lease_is_lost_fails_saying_why(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second = submitted(store), submitted(store, prompt="unusable")
    queue = Queue(store, second)
    job = ScriptedJob(b"1", registry=registry)
    _lose_the_lease_during(job, registry, first)

    serve(dispatcher(store, registry, job), first, queue)

    failed = store.get(second.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "the input is gone"
    assert len(job.calls) == 1  # it never reached a GPU
    assert in_flight(registry, "gpu-a") == 0


def test_a_task_claimed_as_its_slots_lease_is_lost_takes_a_slot_afresh(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second = submitted(store), submitted(store)
    queue = Queue(store, second)
    job = ScriptedJob(b"1", b"2", registry=registry)
    _lose_the_lease_during(job, registry, first)

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE

    # The renewal failed beside a claim that won: the task ran on a slot leased afresh,
    # as its next attempt, never two calls on the one-slot endpoint.
    assert [c[1] for c in job.calls] == [1, 2]
    assert job.in_flight_seen == [1, 1]
    assert store.get(second.task_id).status is TaskStatus.DONE  # type: ignore[union-attr]
    assert in_flight(registry, "gpu-a") == 0


def test_a_pulled_task_whose_call_fails_on_the_kept_slot_retries_on_another_endpoint(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, second = submitted(store), submitted(store)
    queue = Queue(store, second)
    job = ScriptedJob(b"1", RetryableGpuError("HTTP 503"), b"2", registry=registry, rows=store)
    d = dispatcher(store, registry, job)
    job_run = job.run

    def add_gpu_b_after_the_failure(
        endpoint: Endpoint, task: Task, job_input: Any, *, timeout_seconds: float, **_: Any
    ) -> Any:
        try:
            return job_run(endpoint, task, job_input, timeout_seconds=timeout_seconds)
        finally:
            if len(job.calls) == 2:  # the second call failed: another GPU joins the fleet
                healthy(registry, "gpu-b")

    job.run = add_gpu_b_after_the_failure  # type: ignore[method-assign]

    assert serve(d, first, queue) is DispatchOutcome.DONE

    # The failed call's task moved on as its next attempt, on the endpoint it had not tried,
    # with the failure recorded as its last error.
    assert [(c[0], c[1]) for c in job.calls] == [("gpu-a", 1), ("gpu-a", 1), ("gpu-b", 2)]
    assert job.rows_seen[1:] == [
        (TaskStatus.RUNNING, "gpu-a", None, 1),
        (TaskStatus.RUNNING, "gpu-b", "attempt 1 on gpu-a: HTTP 503", 2),
    ]
    done = store.get(second.task_id)
    assert done is not None
    assert done.status is TaskStatus.DONE
    assert job.released_all(2)
    assert in_flight(registry, "gpu-a") == in_flight(registry, "gpu-b") == 0


def test_an_unusable_task_pulled_onto_a_kept_slot_fails_saying_why_and_the_slot_goes_on(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    first, bad, third = submitted(store), submitted(store, prompt="unusable"), submitted(store)
    queue = Queue(store, bad, third)
    job = ScriptedJob(b"1", b"3", registry=registry)

    assert serve(dispatcher(store, registry, job), first, queue) is DispatchOutcome.DONE

    failed = store.get(bad.task_id)
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "the input is gone"
    assert store.get(third.task_id).status is TaskStatus.DONE  # type: ignore[union-attr]
    assert [c[0] for c in job.calls] == ["gpu-a", "gpu-a"]
    assert in_flight(registry, "gpu-a") == 0


class ReadCountingStore(TaskStore):
    """The task store, counting reads of a task before its claim."""

    gets = 0

    def get(self, task_id: str) -> Task | None:
        ReadCountingStore.gets += 1
        return super().get(task_id)


def _counting(store: TaskStore) -> ReadCountingStore:
    counting = ReadCountingStore.__new__(ReadCountingStore)
    counting.__dict__.update(store.__dict__)
    ReadCountingStore.gets = 0
    return counting


def first_message(
    d: TaskDispatcher, store: TaskStore, task: Task, priority: Priority | None
) -> DispatchOutcome:
    """A worker's first message (as the queue's trigger hands it over), saying `priority`."""
    return d.dispatch(
        QueueMessage(task_id=task.task_id, priority=priority),
        remaining_seconds=lambda: PLENTY,
        next_tasks=Queue(store),
    )


def test_a_workers_first_normal_task_is_claimed_on_a_fresh_slot_without_a_read(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    task = submitted(store)
    counting = _counting(store)
    job = ScriptedJob(b"png", registry=registry)

    outcome = first_message(dispatcher(counting, registry, job), store, task, Priority.NORMAL)

    assert outcome is DispatchOutcome.DONE
    assert ReadCountingStore.gets == 0
    assert [c[:2] for c in job.calls] == [("gpu-a", 1)]
    assert store.get(task.task_id).status is TaskStatus.DONE  # type: ignore[union-attr]
    assert in_flight(registry, "gpu-a") == 0


def test_a_first_message_for_a_canceled_task_ends_there_and_gives_its_fresh_slot_back(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    task = submitted(store)
    store.cancel(task.task_id, "alice")
    job = ScriptedJob(b"png", registry=registry)

    outcome = first_message(dispatcher(store, registry, job), store, task, Priority.NORMAL)

    assert outcome is DispatchOutcome.SKIPPED
    assert job.calls == []
    assert store.get(task.task_id).status is TaskStatus.CANCELED  # type: ignore[union-attr]
    assert in_flight(registry, "gpu-a") == 0


def test_a_message_that_does_not_say_its_priority_is_read_first(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a")
    task = submitted(store)
    counting = _counting(store)
    job = ScriptedJob(b"png", registry=registry)

    # Sent before messages carried it.
    outcome = first_message(dispatcher(counting, registry, job), store, task, None)

    assert outcome is DispatchOutcome.DONE
    assert ReadCountingStore.gets == 1


# --- a cancel its owner asked for ------------------------------------------------------


class CancelingJob(ScriptedJob):
    """Its owner cancels the task during the call; the server stops and the adapter raises
    GpuCanceled, as `gpu.call_watch.watched` makes it."""

    def __init__(self, store: TaskStore, *, lose_the_lease: bool = False) -> None:
        super().__init__(GpuCanceled("canceled by its owner while it ran"))
        self._store = store
        self._lose_the_lease = lose_the_lease

    def run(self, endpoint: Any, task: Task, job_input: Any, **kwargs: Any) -> Any:
        asked = self._store.cancel(task.task_id, task.user_id)
        assert asked.status is TaskStatus.RUNNING
        assert asked.cancel_requested_at is not None
        if self._lose_the_lease:  # the reaper took it over meanwhile (a stalled worker)
            running = self._store.get(task.task_id)
            assert running is not None
            assert running.lease_until is not None
            assert self._store.claim(running, lease_seconds=60, now=running.lease_until + 1)
        return super().run(endpoint, task, job_input, **kwargs)


def _slots_free(registry: EndpointRegistry) -> bool:
    return in_flight(registry, "gpu-a") == 0


def test_a_task_canceled_while_its_gpu_ran_ends_canceled_with_nothing_stored(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", protocol=EndpointProtocol.A1111)
    job = CancelingJob(store)
    task = submitted(store)

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.CANCELED

    ended = store.get(task.task_id)
    assert ended is not None
    assert (ended.status, ended.result_key, ended.progress) == (TaskStatus.CANCELED, None, None)
    assert job.stored == []
    assert _slots_free(registry)
    # The endpoint did nothing wrong: no failure counted against its circuit.
    endpoint = registry.get("gpu-a")
    assert endpoint is not None
    assert endpoint.consecutive_failures == 0


def test_a_cancel_recorded_after_the_lease_was_taken_over_is_left_to_the_new_holder(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", protocol=EndpointProtocol.A1111)
    task = submitted(store)

    outcome = dispatch(dispatcher(store, registry, CancelingJob(store, lose_the_lease=True)), task)

    assert outcome is DispatchOutcome.SKIPPED
    assert store.get(task.task_id).status is TaskStatus.RUNNING  # type: ignore[union-attr]
    assert _slots_free(registry)


def test_a_task_whose_cancel_came_between_its_attempts_ends_canceled_without_a_call(
    store: TaskStore, registry: EndpointRegistry
) -> None:
    healthy(registry, "gpu-a", protocol=EndpointProtocol.A1111)
    task = submitted(store)
    # Its first attempt: the cancel is asked while it runs, then the call fails and the
    # task goes back to the queue with the request on it.
    claim = store.claim(
        task,
        lease_seconds=60,
        now=time.time(),
        endpoint_id="gpu-a",
        endpoint_protocol=EndpointProtocol.A1111,
    )
    assert claim is not None
    store.cancel(task.task_id, task.user_id)
    assert store.release_for_retry(claim, error="HTTP 503", endpoint_id="gpu-a")
    job = ScriptedJob(RetryableGpuError("never called"))

    assert dispatch(dispatcher(store, registry, job), task) is DispatchOutcome.CANCELED

    assert job.calls == []
    assert store.get(task.task_id).status is TaskStatus.CANCELED  # type: ignore[union-attr]
    assert _slots_free(registry)
