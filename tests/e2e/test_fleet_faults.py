"""Endpoint faults on a stack of its own (it kills a stand-in, so it shares with no one)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from .conftest import ApiUser, LocalStackProcess, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]


@pytest.fixture(scope="module")
def fleet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStackProcess]:
    with running_stack(
        tmp_path_factory.mktemp("fleet-stack"),
        "--image-latency",
        "0.5",
        "--param",
        "WorkerPoolSize=4",
        # One fresh user queues 12 tasks at once: no per-user share, no new-account limit.
        "--param",
        "UserQueueSharePercent=100",
        "--param",
        "NewAccountHours=0",
    ) as stack:
        yield stack


def _admin_endpoints(stack: LocalStackProcess) -> list[dict]:
    token = stack.state["admin_user"]["token"]
    response = requests.get(
        f"{stack.api}/api/v1/admin/endpoints",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    response.raise_for_status()
    return list(response.json())


def _user(stack: LocalStackProcess) -> ApiUser:
    name = f"f{uuid.uuid4().hex[:8]}"
    token = requests.post(
        f"{stack.api}/register", json={"username": name, "password": "pass1234word"}, timeout=30
    ).json()["token"]
    return ApiUser(stack.api, name, "pass1234word", token)


def test_killed_endpoint_gets_no_new_work_within_5s_and_every_task_finishes(fleet_stack):
    user = _user(fleet_stack)
    victim_url = fleet_stack.state["image_servers"][0]
    ids = [user.submit(f"fleet {i}") for i in range(12)]
    deadline = time.monotonic() + 20
    while fleet_stack.endpoint_stats(0)["calls"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)

    requests.post(f"{victim_url}/shutdown", timeout=5)  # dies mid-run
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < 5:
        victim = next(e for e in _admin_endpoints(fleet_stack) if e["url"] == victim_url)
        if not victim["routable"]:
            break
        time.sleep(0.1)
    assert not victim["routable"], victim  # taken out of rotation within 5 s
    assert time.monotonic() - killed_at < 5

    tasks = [user.wait(i, timeout=60) for i in ids]
    assert [t["status"] for t in tasks] == ["DONE"] * 12
    in_flight = sum(e["in_flight"] for e in _admin_endpoints(fleet_stack) if e["url"] == victim_url)
    assert in_flight == 0


def test_stand_ins_never_exceed_their_capacity(fleet_stack):
    # The admin view and the stand-in's own count agree: peak concurrency <= capacity.
    survivor = fleet_stack.state["image_servers"][1]
    row = next(e for e in _admin_endpoints(fleet_stack) if e["url"] == survivor)
    assert fleet_stack.endpoint_stats(1)["max_in_flight"] <= row["capacity"]
