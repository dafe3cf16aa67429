"""What the tools that drive an in-process local stack share (bench, chaos, load): moto
credentials, users, reading many tasks at once, and the machine line of their reports."""

from __future__ import annotations

import os
import platform
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import requests


def use_local_aws() -> None:
    """Dummy credentials and a region for moto (a real profile is never needed, or used),
    and a SIGTERM (timeout, Ctrl-C from make) that still stops the stack's processes."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def machine() -> str:
    cpus = os.cpu_count()
    return (
        f"{platform.system()} {platform.machine()}, {cpus} CPUs, Python {platform.python_version()}"
    )


def register_users(api: str, prefix: str, count: int) -> list[str]:
    """`count` new users' access tokens."""

    def register(i: int) -> str:
        credentials = {"username": f"{prefix}{i}-{os.getpid()}", "password": f"{prefix}-pass-1234"}
        response = requests.post(f"{api}/register", json=credentials, timeout=30)
        response.raise_for_status()
        return str(response.json()["token"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(register, range(count)))


def submit_image(api: str, token: str, prompt: str) -> str:
    """Queue one small image task over HTTP; its task id."""
    response = requests.post(
        f"{api}/api/v1/image/async",
        headers={"Authorization": f"Bearer {token}"},
        json={"prompt": prompt, "width": 64, "height": 64},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["task_id"])


def read_tasks(
    table: Any, ids: list[str], attributes: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """The tasks' rows in BatchGetItem pages: one request per 100, not one per task, so
    the tool's own polling does not load the control plane it measures; `attributes`
    (always with the key) keeps a poll's answers small: moto spends most of its time
    serialising whole rows."""
    rows: list[dict[str, Any]] = []
    projection: dict[str, Any] = {}
    if attributes:
        names = ("task_id", *attributes)
        projection = {
            "ProjectionExpression": ", ".join(f"#a{i}" for i in range(len(names))),
            "ExpressionAttributeNames": {f"#a{i}": name for i, name in enumerate(names)},
        }
    for start in range(0, len(ids), 100):
        keys: list[dict[str, Any]] = [{"task_id": i} for i in ids[start : start + 100]]
        while keys:
            # The resource (not table.meta.client) deserialises the items.
            request: Any = {"Keys": keys, "ConsistentRead": True, **projection}
            page = boto3.resource("dynamodb").batch_get_item(RequestItems={table.name: request})
            rows.extend(page["Responses"].get(table.name, []))
            unprocessed: dict[str, Any] = dict(page.get("UnprocessedKeys", {}))
            keys = list(unprocessed.get(table.name, {}).get("Keys", []))
    return rows
