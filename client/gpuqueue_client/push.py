"""Task events pushed over a WebSocket: the URL to connect to and the frames that matter.

The API names its push endpoint in an `X-Push-Url` header (on the submit answer and on task
status answers; absent when the stack has no push). A client connects to
`<X-Push-Url>?token=<access token>` and receives JSON text frames
`{"type": "task.done" | "task.failed" | "task.canceled" | "task.expired", "task": {...}}`,
the task shaped like `GET /api/v1/tasks/{id}`'s answer, for the user's own tasks; while a
task runs, `task.progress` (its `progress`: step, steps, fraction, eta_seconds) and
`task.cancel_requested` (`cancel_requested`: its GPU is being stopped) carry it RUNNING.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlsplit

PUSH_URL_HEADER = "X-Push-Url"
FINAL_EVENT_TYPES = frozenset({"task.done", "task.failed", "task.canceled", "task.expired"})
RUNNING_EVENT_TYPES = frozenset({"task.progress", "task.cancel_requested"})
PUSH_EVENT_TYPES = FINAL_EVENT_TYPES | RUNNING_EVENT_TYPES


def push_connect_url(push_url: str, token: str, *, api_url: str) -> str | None:
    """The URL to open (the token added as `token=`), or None when it must not be used.

    `wss://` always does; `ws://` only when the API itself is plain `http://` (the local
    stack): the token never travels less protected than it does to the API.
    """
    scheme = urlsplit(push_url).scheme.lower()
    api_scheme = urlsplit(api_url).scheme.lower()
    if scheme != "wss" and not (scheme == "ws" and api_scheme == "http"):
        return None
    separator = "&" if urlsplit(push_url).query else "?"
    return f"{push_url}{separator}token={quote(token, safe='')}"


def pushed_task(frame: str | bytes, task_id: str) -> dict[str, Any] | None:
    """The task a frame's event carries when it is about `task_id`, else None."""
    try:
        event = json.loads(frame)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") not in PUSH_EVENT_TYPES:
        return None
    task = event.get("task")
    return task if isinstance(task, dict) and task.get("task_id") == task_id else None
