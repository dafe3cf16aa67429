"""Fair share on the local stack, over HTTP with real concurrency: the priority lane goes
first but never starves normal work, and a user's active-task share is exact."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
import requests

from gpuqueue_testing import wait_for

from .conftest import ApiUser, LocalStackProcess, register_user, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

ACTIVE_LIMIT = 20
LATENCY_S = 0.3


@pytest.fixture(scope="module")
def lane_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStackProcess]:
    # One endpoint with 2 slots (stand-in and registry); 2 normal workers; the
    # high-priority lane's 2 workers (SQS's least) hold 1 slot at most (its one seat).
    with running_stack(
        tmp_path_factory.mktemp("lane-stack"),
        "--image-servers",
        "1",
        "--image-capacity",
        "2",
        "--image-latency",
        str(LATENCY_S),
        "--speech-servers",
        "0",
        "--no-s3-events",
        "--param",
        "WorkerPoolSize=2",
        "--param",
        "PriorityLaneWorkers=1",
        "--param",
        f"MaxActiveTasksPerUser={ACTIVE_LIMIT}",
        "--param",
        "SubmitBurst=200",
        "--param",
        "SubmitRatePerSecond=50",
        # Fresh users queue many tasks each here: no per-user share, no new-account limit.
        "--param",
        "UserQueueSharePercent=100",
        "--param",
        "NewAccountHours=0",
    ) as stack:
        yield stack


def _vip(stack: LocalStackProcess) -> ApiUser:
    """A user in the Cognito group vip, logged in again so the token carries the group."""
    user = register_user(stack)
    stack.aws("cognito-idp").admin_add_user_to_group(
        UserPoolId=stack.state["resources"]["UserPool"], Username=user.username, GroupName="vip"
    )
    response = requests.post(
        f"{stack.api}/login",
        json={"username": user.username, "password": user.password},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    user.token = response.json()["token"]
    return user


def _set_slots(stack: LocalStackProcess, capacity: int) -> None:
    """The endpoint's registered capacity, as an operator sets it (admin API)."""
    admin = {"Authorization": f"Bearer {stack.state['admin_user']['token']}"}
    listed = requests.get(f"{stack.api}/api/v1/admin/endpoints", headers=admin, timeout=10)
    [endpoint] = [e for e in listed.json() if e["kind"] == "image"]
    response = requests.put(
        f"{stack.api}/api/v1/admin/endpoints/{endpoint['endpoint_id']}",
        headers=admin,
        json={"url": endpoint["url"], "kind": "image", "capacity": capacity},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def _sub(user: ApiUser) -> str:
    payload = user.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sub"])


def _finished(user: ApiUser, ids: list[str], timeout: float = 90.0) -> list[dict[str, Any]]:
    return [user.wait(task_id, timeout=timeout) for task_id in ids]


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


# 50 submits and their 1 s calls: minutes on a loaded 2-core machine, past the suite's 120 s.
@pytest.mark.timeout(300)
def test_a_vip_task_behind_50_normal_ones_starts_before_them(lane_stack):
    normal_users = [register_user(lane_stack) for _ in range(5)]
    vip = _vip(lane_stack)
    # GPU-like calls (1 s), held while the 50 and the VIP task are submitted: the queue is
    # 50 deep when the VIP task comes, however slowly this machine takes the submits.
    lane_stack.knobs(0, latency_s=1.0, hang=True)
    try:
        _vip_goes_first(lane_stack, normal_users, vip)
    finally:
        lane_stack.knobs(0, latency_s=LATENCY_S, hang=False)


def _vip_goes_first(
    lane_stack: LocalStackProcess, normal_users: list[ApiUser], vip: ApiUser
) -> None:
    normal: list[tuple[ApiUser, str]] = []
    try:
        for i in range(50):
            user = normal_users[i % len(normal_users)]
            normal.append((user, user.submit(f"normal {i}")))
        vip_id = vip.submit("vip", priority="high")
    finally:
        lane_stack.knobs(0, hang=False)  # the held calls end; the slots free up

    try:
        _vip_started_first(normal, vip, vip_id)
    finally:
        # Leave an empty queue to the next test, whatever happened here.
        for user, task_id in normal:
            user.delete(f"/api/v1/tasks/{task_id}")


def _vip_started_first(normal: list[tuple[ApiUser, str]], vip: ApiUser, vip_id: str) -> None:
    vip_task = vip.wait(vip_id, timeout=60)
    assert vip_task["status"] == "DONE"
    assert vip_task["priority"] == "high"
    now = [user.get(f"/api/v1/tasks/{task_id}").json() for user, task_id in normal]
    vip_submitted, vip_started = _time(vip_task["created_at"]), _time(vip_task["started_at"])
    # Still waiting when the VIP task came: those not started by then (or not started yet).
    waiting = [
        t for t in now if t.get("started_at") is None or _time(t["started_at"]) > vip_submitted
    ]
    overtook = [t for t in waiting if t.get("started_at") and _time(t["started_at"]) < vip_started]
    # First in first out, every one of them would have started before it. The VIP task
    # starts at the first slot freed once its worker has it (pickup ~1-2 s on a loaded
    # 2-core machine: a normal task or two of 1 s on each slot goes meanwhile).
    assert len(waiting) >= 30, len(waiting)
    assert len(overtook) <= len(waiting) // 5, [t["prompt"] for t in overtook]


@pytest.mark.timeout(300)
def test_normal_tasks_still_progress_under_a_flood_of_vip_tasks(lane_stack):
    vip = _vip(lane_stack)
    user = register_user(lane_stack)
    # Calls held while both are submitted: the flood cannot drain before the normal tasks
    # are in, however slowly this machine takes the submits.
    lane_stack.knobs(0, hang=True)
    try:
        flood = [vip.submit(f"flood {i}", priority="high") for i in range(ACTIVE_LIMIT)]
        normal = [user.submit(f"under the flood {i}") for i in range(6)]
    finally:
        lane_stack.knobs(0, hang=False)

    vip_done = _finished(vip, flood)
    normal_done = _finished(user, normal)

    assert {t["status"] for t in vip_done + normal_done} == {"DONE"}
    last_vip = max(_time(t["updated_at"]) for t in vip_done)
    last_normal = max(_time(t["updated_at"]) for t in normal_done)
    # The VIP lane holds at most one slot (its one seat), whatever its 2 workers want: the
    # normal tasks went on beside it and were all done while VIP tasks were still waiting.
    assert last_normal < last_vip
    vip_starts = sorted(_time(t["started_at"]) for t in vip_done)
    assert all(_time(t["started_at"]) < vip_starts[-3] for t in normal_done)


def test_k_plus_1_concurrent_submits_create_exactly_k_tasks_and_finishing_frees_them(
    lane_stack,
):
    user = register_user(lane_stack)
    lane_stack.knobs(0, hang=True)  # nothing finishes while the submits race
    try:

        def submit(i: int) -> requests.Response:
            return user.post("/api/v1/image/async", json={"prompt": f"race {i}"})

        with ThreadPoolExecutor(max_workers=ACTIVE_LIMIT + 1) as pool:
            answers = list(pool.map(submit, range(ACTIVE_LIMIT + 1)))

        codes = sorted(a.status_code for a in answers)
        assert codes == [202] * ACTIVE_LIMIT + [429], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.json()["code"] == "ACTIVE_TASK_LIMIT"
        assert refused.json()["field"] == "active_tasks"
        accepted = [a.json()["task_id"] for a in answers if a.status_code == 202]
        listed = user.get("/api/v1/tasks?limit=100").json()
        assert sorted(t["task_id"] for t in listed) == sorted(accepted)

        # A cancel frees a share at once (still held: only the two slots' tasks run).
        queued = [t["task_id"] for t in listed if t["status"] == "QUEUED"]
        assert user.delete(f"/api/v1/tasks/{queued[-1]}").status_code == 200
        again = user.post("/api/v1/image/async", json={"prompt": "after the cancel"})
        assert again.status_code == 202, again.text
    finally:
        lane_stack.knobs(0, hang=False)  # the held calls go on

    # Once every task has ended (the rest canceled, the held calls finished), the tasks
    # stream has released every share.
    for task_id in [*accepted, again.json()["task_id"]]:
        user.delete(f"/api/v1/tasks/{task_id}")  # 409 for the ones already running: fine
    finished = _finished(user, [*accepted, again.json()["task_id"]])
    assert {t["status"] for t in finished} <= {"DONE", "CANCELED"}
    limits = lane_stack.aws_resource("dynamodb").Table(lane_stack.state["resources"]["LimitsTable"])

    def share_empty() -> bool:
        item = limits.get_item(Key={"pk": f"active#{_sub(user)}"}).get("Item") or {}
        return not item.get("active")

    # The stream's lag is well under a second here, seconds on a loaded machine.
    wait_for(share_empty, timeout=30, what="the stream released the ended tasks' shares")
    assert submit(ACTIVE_LIMIT + 1).status_code == 202


def test_queue_position_falls_to_0_and_the_eta_is_within_20_percent(lane_stack):
    # Two slots and two normal workers, one each (as WorkerPoolSize should be sized: a
    # worker keeps its slot for the next task, so a spare one could only hand its message
    # to the back of the queue), a GPU-like call (2 s: the work around each call is a small
    # part of it): a queue whose drain time is known.
    user = register_user(lane_stack)
    lane_stack.knobs(0, latency_s=2.0)
    # The module's earlier tests hold calls for as long as their submits take: measured, one
    # such call would make this ETA's own call seconds long. The warm burst measures afresh.
    lane_stack.forget_call_times()
    # Likewise the lane's gaps between departures: the earlier tests' calls were faster.
    limits = lane_stack.aws_resource("dynamodb").Table(lane_stack.state["resources"]["LimitsTable"])
    limits.update_item(
        Key={"pk": "lane#normal"}, UpdateExpression="REMOVE recent_gaps, gap_seconds"
    )
    try:
        # A burst first: the calls measure the endpoint, the departures the lane's pace.
        for task_id in [user.submit(f"warm {i}") for i in range(8)]:
            user.wait(task_id)
        # Calls held while the 16 are submitted: the queue is 16 deep when it is first
        # looked at, however slowly this machine takes the submits; the clock starts at the
        # release. 16 (the user's active-task limit is 20): a position can be a task stale
        # (the stream is ~0.3 s behind).
        lane_stack.knobs(0, hang=True)
        try:
            ids = [user.submit(f"queued {i}") for i in range(16)]
            last = ids[-1]
            first_look = user.get(f"/api/v1/tasks/{last}").json()
        finally:
            lane_stack.knobs(0, hang=False)
        asked_at = time.time()
        positions = []
        while True:
            task: dict[str, Any] = user.get(f"/api/v1/tasks/{last}").json()
            if task["status"] != "QUEUED":
                break
            positions.append(task["queue_position"])
            time.sleep(0.2)
        done = user.wait(last, timeout=60)
    finally:
        lane_stack.knobs(0, latency_s=LATENCY_S)

    # A real queue: most are still waiting. Two calls hang; each worker may also have claimed
    # its next task half a second before its call was due to end (the early receive), so 11
    # to 13 are ahead of the last.
    assert first_look["queue_position"] >= 11
    assert positions == sorted(positions, reverse=True)
    # Positions count departures as the tasks stream reports them (~0.3 s behind), and SQS
    # hands out messages in roughly, not exactly, the order sent: with two workers taking
    # tasks side by side, the last task may start just before the one ahead of it, and each
    # worker claims its next task ahead of its call's end. So its last reading before it
    # starts is 0 to 3 (the integration test checks each step exactly, on an ordered queue
    # with the stream read at once).
    assert positions[-1] <= 3
    actual = _time(done["updated_at"]).timestamp() - asked_at
    estimated = first_look["eta_seconds"]
    assert abs(estimated - actual) <= 0.2 * actual, (estimated, actual)
