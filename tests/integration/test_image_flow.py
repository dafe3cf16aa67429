"""The seed's happy path: submit -> queue -> dispatcher -> GPU -> S3 -> DONE -> image."""

from __future__ import annotations

import io

import boto3
import requests
from PIL import Image

from gpuqueue.store.image_store import result_key


def test_submitted_task_is_generated_stored_and_downloadable(make_stack, alice):
    # Given a stack with one healthy image endpoint
    h = make_stack()
    assert h.run_checker() == {"checked": 1, "healthy": 1}

    # When alice submits and the dispatcher drains the queue
    submitted = h.submit(alice, {"prompt": "a red fox in snow", "width": 128, "height": 96})
    assert submitted.status == 202
    body = submitted.json()
    assert body["status"] == "QUEUED"
    assert body["message"]
    task_id = body["task_id"]
    assert h.get_task(alice, task_id).json()["status"] == "QUEUED"
    h.drain()

    # Then the task is DONE with a result URL, the PNG is in S3 under its deterministic key,
    # and the presigned URL the API redirects to serves the same bytes.
    task = h.get_task(alice, task_id).json()
    assert task["status"] == "DONE"
    assert task["result_url"] == f"/api/images/{task_id}"
    assert task["user_id"] == alice.sub
    assert task["prompt"] == "a red fox in snow"
    assert task["created_at"] <= task["updated_at"]
    assert "error" not in task or task["error"] is None

    stored = (
        boto3.client("s3")
        .get_object(Bucket=h.stack.ref("ImagesBucket"), Key=result_key(task_id))["Body"]
        .read()
    )
    redirect = h.call(
        "tasks_handler",
        "GET",
        f"/api/images/{task_id}",
        route="/api/images/{task_id}",
        path_params={"task_id": task_id},
        user=alice,
    )
    assert redirect.status == 302
    location = redirect.headers["location"]
    assert "X-Amz-Expires=300" in location
    downloaded = requests.get(location, timeout=10)
    assert downloaded.status_code == 200, downloaded.text
    assert downloaded.content == stored
    assert Image.open(io.BytesIO(downloaded.content)).size == (128, 96)
    assert h.image_servers[0].stats()["prompts"] == ["a red fox in snow"]
