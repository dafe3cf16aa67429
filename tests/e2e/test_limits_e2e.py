"""Idempotent submit over HTTP: concurrent replays of one Idempotency-Key are one GPU job."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]


def test_five_concurrent_replays_of_one_key_make_one_task_and_one_gpu_call(local_stack, new_user):
    prompt = f"idempotent {uuid.uuid4().hex[:8]}"
    headers = {**new_user.auth, "Idempotency-Key": f"order-{uuid.uuid4()}"}

    def submit(_: int) -> requests.Response:
        return requests.post(
            f"{new_user.api}/api/v1/image/async",
            json={"prompt": prompt},
            headers=headers,
            timeout=30,
        )

    with ThreadPoolExecutor(max_workers=5) as pool:
        answers = list(pool.map(submit, range(5)))

    # The first wins; replays get its answer, or 409 while it is still being written.
    assert {a.status_code for a in answers} <= {202, 409}, [a.text for a in answers]
    accepted = {a.json()["task_id"] for a in answers if a.status_code == 202}
    assert len(accepted) == 1
    task_id = accepted.pop()
    assert new_user.wait(task_id)["status"] == "DONE"
    listed = new_user.get("/api/v1/tasks?limit=100").json()
    assert [t["task_id"] for t in listed if t["prompt"] == prompt] == [task_id]
    gpu_calls = sum(
        local_stack.endpoint_stats(i)["prompts"].count(prompt)
        for i in range(len(local_stack.state["image_servers"]))
    )
    assert gpu_calls == 1
    # A later replay still answers with the same task.
    assert submit(0).json()["task_id"] == task_id
