"""Queue deadlines: a task not started in time ends EXPIRED and never reaches a GPU."""

from __future__ import annotations

import time

import pytest

from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import wait_for


def _past(deadline: float) -> bool:
    return time.time() > deadline


def _wait_out_the_deadline(h, task_id: str) -> None:
    deadline = float(h.task_row(task_id)["queue_deadline"])
    wait_for(lambda: _past(deadline), timeout=5, what="the queue deadline to pass")


def _expired_task(h, alice) -> str:
    h.run_checker()
    task_id = h.submit(alice, {"prompt": "late", "queue_ttl_seconds": 1}).json()["task_id"]
    _wait_out_the_deadline(h, task_id)
    h.drain()
    return str(task_id)


def test_a_task_not_started_before_its_deadline_expires_without_a_gpu_call(make_stack, alice):
    h = make_stack()

    task_id = _expired_task(h, alice)

    task = h.get_task(alice, task_id).json()
    assert task["status"] == "EXPIRED"
    assert "queue deadline" in task["error"]
    assert h.image_servers[0].stats()["calls"] == 0


def test_a_task_started_in_time_is_not_expired_when_retried_later(make_stack, alice):
    h = make_stack(endpoints=[ImageServerKnobs(failure_rate=1.0, failure_seed=1)])
    h.run_checker()
    # 3 s: the first attempt must start in time (a worker's first claim checks the deadline
    # when it claims, after taking its slot) even on a loaded machine.
    task_id = h.submit(alice, {"prompt": "p", "queue_ttl_seconds": 3}).json()["task_id"]
    # Attempt 1 fails; too little time left for another call: QUEUED again, started once.
    h.deliver(h.receive(), timeout_seconds=60)
    assert h.task_row(task_id)["status"] == "QUEUED"
    _wait_out_the_deadline(h, task_id)
    h.image_servers[0].set_knobs({"failure_rate": 0.0})

    h.drain()

    # The deadline is about waiting to start; a run already under way finishes its attempts.
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def test_the_default_deadline_comes_from_the_stack_parameter(make_stack, alice):
    h = make_stack(parameters={"QueueTtlSeconds": "120"})
    task_id = h.submit(alice).json()["task_id"]

    row = h.task_row(task_id)

    assert int(row["queue_ttl_seconds"]) == 120
    assert float(row["queue_deadline"]) == pytest.approx(time.time() + 120, abs=10)


@pytest.mark.parametrize("ttl", [0, -5, 345_601, "soon"])
def test_an_impossible_queue_deadline_is_a_400_naming_the_field(make_stack, alice, ttl):
    h = make_stack()

    response = h.submit(alice, {"prompt": "p", "queue_ttl_seconds": ttl})

    assert response.status == 400
    assert response.json()["field"] == "queue_ttl_seconds"


def test_an_expired_task_cannot_be_canceled(make_stack, alice):
    h = make_stack()
    task_id = _expired_task(h, alice)

    assert h.cancel(alice, task_id).status == 409
