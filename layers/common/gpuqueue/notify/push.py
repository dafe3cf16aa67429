"""Push over WebSocket: a finished task, and a running task's progress, is sent to its
owner's open connections.

Path: a client connects to the stack's WebSocket API (`$connect` checks its access token and
records the connection here, `$disconnect` forgets it) -> a task reaches a final state -> the
tasks table's stream -> TaskEventsFunction (`PushNotifier`, a task-end listener) posts
`{"type": "task.done", "task": {...}}` to each of the owner's connections through the
stage's management API (`POST /@connections/{id}`). A running task's progress (step n of N)
and its cancel asked go the same way as `task.progress` / `task.cancel_requested` (a
`RunningTaskListener`), at most one per task per 2 s (the dispatcher's write rate).

A push is best effort: a connection that is gone (410) is forgotten, any other failure is
logged and never fails the stream record (webhooks are the channel that retries). Delivery
is at least once: a repeated stream record may push the same event twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayWebSocketConnectEventModel,
    APIGatewayWebSocketDisconnectEventModel,
)
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field

from gpuqueue.models import Task, TaskView, iso, utc_now

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

logger = Logger(child=True)

USER_INDEX = "by-user"
# API Gateway closes a connection after 2 hours at most: its row is useless after that.
CONNECTION_TTL_SECONDS = 7200
# A management API call: fail fast, one retry (a push that comes late is worth little).
MANAGEMENT_SDK_CONFIG = Config(
    connect_timeout=2, read_timeout=3, retries={"max_attempts": 2, "mode": "standard"}
)
GONE = "GoneException"


# --- the WebSocket API's events (Powertools' models, plus what they leave out) --------------


class ConnectEvent(APIGatewayWebSocketConnectEventModel):
    query_string_parameters: dict[str, str] | None = Field(None, alias="queryStringParameters")


class DisconnectEvent(APIGatewayWebSocketDisconnectEventModel):
    pass


# --- connections ------------------------------------------------------------------------------


class ConnectionStore:
    """The connections table: one row per open connection, found by user through a GSI."""

    def __init__(
        self,
        table: Table,
        *,
        ttl_seconds: int = CONNECTION_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = table
        self._ttl_seconds = ttl_seconds
        self._clock = clock

    def put(self, connection_id: str, user_id: str, connected_at: datetime | None = None) -> None:
        connected = connected_at or utc_now()
        self._table.put_item(
            Item={
                "connection_id": connection_id,
                "user_id": user_id,
                "connected_at": iso(connected),
                "expires_at": int(connected.timestamp()) + self._ttl_seconds,
            }
        )

    def delete(self, connection_id: str) -> None:
        self._table.delete_item(Key={"connection_id": connection_id})

    def by_user(self, user_id: str) -> list[str]:
        """The user's connection ids, leaving out rows past their expiry that TTL has not
        deleted yet (it may take days)."""
        now = self._clock()
        return [
            str(item["connection_id"])
            for item in self._query(user_id)
            if int(item.get("expires_at", now + 1)) > now
        ]

    def _query(self, user_id: str) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "IndexName": USER_INDEX,
            "KeyConditionExpression": "user_id = :u",
            "ExpressionAttributeValues": {":u": user_id},
        }
        while True:
            page = self._table.query(**kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# --- pushing ----------------------------------------------------------------------------------


class ManagementApi(Protocol):
    """The part of boto3's `apigatewaymanagementapi` client the notifier uses."""

    def post_to_connection(self, *, Data: bytes, ConnectionId: str) -> Any: ...


@cache
def management_api(endpoint_url: str) -> ManagementApi:
    """The stage's management API client (`https://{api}.execute-api.{region}.amazonaws.com/
    {stage}`), one per container."""
    client: ManagementApi = boto3.client(
        "apigatewaymanagementapi", endpoint_url=endpoint_url, config=MANAGEMENT_SDK_CONFIG
    )
    return client


# A running task's pushed changes (never webhooks: those are for its end).
PROGRESS_EVENT = "task.progress"  # its GPU reported a step: `task.progress` is step n of N
CANCEL_REQUESTED_EVENT = "task.cancel_requested"  # its owner asked; the GPU is stopping


def push_message(task: Task) -> dict[str, Any]:
    """What a connection receives: the event type and the task as the status API shows it.

    A final task's type names its state (`task.done`, ...); a running one's names what
    changed (`task.cancel_requested` once its cancel is asked, else `task.progress`), the
    task carrying it (`progress`, `cancel_requested`) as the status API shows it."""
    view = TaskView.of(task)
    if task.status.is_terminal:
        kind = f"task.{task.status.value.lower()}"
    elif view.cancel_requested:
        kind = CANCEL_REQUESTED_EVENT
    else:
        kind = PROGRESS_EVENT
    return {"type": kind, "task": view.model_dump(mode="json")}


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class PushNotifier:
    """A task-end and running-task listener: the finished task, or the running task's
    progress or cancel asked, goes to every open connection of its owner."""

    def __init__(self, connections: ConnectionStore, api: ManagementApi) -> None:
        self._connections = connections
        self._api = api

    def tasks_ended(self, tasks: Sequence[Task]) -> None:
        """Each owner's connections read once for all their tasks in the batch."""
        by_owner: dict[str, list[Task]] = {}
        for task in tasks:
            by_owner.setdefault(task.user_id, []).append(task)
        for owner, owned in by_owner.items():
            self._push(owner, owned)

    def task_ended(self, task: Task) -> None:
        self._push(task.user_id, [task])

    def tasks_changed(self, tasks: Sequence[Task]) -> None:
        """Running tasks' progress or cancel asked: pushed as their ends are (a lost one is
        superseded by the next, and by the end)."""
        self.tasks_ended(tasks)

    def _push(self, owner: str, tasks: Sequence[Task]) -> None:
        try:
            connection_ids = self._connections.by_user(owner)
        except (ClientError, BotoCoreError):
            logger.warning("push skipped: connections not readable", exc_info=True)
            return
        if not connection_ids:
            return
        for task in tasks:
            message = push_message(task)
            data = json.dumps(message, separators=(",", ":")).encode()
            sent = 0
            for connection_id in connection_ids:
                if self._post(connection_id, data):
                    sent += 1
            logger.info(
                "task pushed",
                extra={
                    "task_id": task.task_id,
                    "status": task.status.value,
                    "type": message["type"],
                    "connections": len(connection_ids),
                    "sent": sent,
                },
            )

    def _post(self, connection_id: str, data: bytes) -> bool:
        try:
            self._api.post_to_connection(ConnectionId=connection_id, Data=data)
        except ClientError as error:
            if _error_code(error) == GONE:
                self._forget(connection_id)
            else:
                logger.warning(
                    "push to a connection failed",
                    extra={"connection_id": connection_id, "error": _error_code(error)},
                )
            return False
        except BotoCoreError as error:
            logger.warning(
                "push to a connection failed",
                extra={"connection_id": connection_id, "error": type(error).__name__},
            )
            return False
        return True

    def _forget(self, connection_id: str) -> None:
        logger.info("connection gone, forgotten", extra={"connection_id": connection_id})
        try:
            self._connections.delete(connection_id)
        except (ClientError, BotoCoreError):
            logger.warning("gone connection not deleted", extra={"connection_id": connection_id})
