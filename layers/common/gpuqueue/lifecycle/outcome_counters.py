"""OutcomeCounters: how many tasks ended, how, and how long they took, over the last hour.

Rolling counters that scale. One DynamoDB item takes about 1,000 writes a second, so a
single counter row would cap the whole system's throughput; the counts are spread instead:

- time is cut into 5-minute buckets; each bucket has N shard rows in the limits table,
  key `outcomes#<bucket start>#<shard>`; a stream batch's ends are one UpdateItem ADD per
  bucket, on the shard its first task id hashes to (N shards take N x 1,000 batches a
  second);
- reading the last hour is one BatchGetItem of its 13 buckets x N shards (N <= 7 keeps it
  within one call's 100 keys), whatever the number of tasks: no Scan, no Query;
- rows carry `expires_at`, so the table's TTL deletes buckets once they leave the window.

The tasks table's stream drives `record` once per task reaching a final state. The stream is
at-least-once: a batch retried after a failure may count a task twice. These are operators'
figures (the alarms use CloudWatch metrics), so a rare double count is accepted rather than
paying for a per-task dedupe write.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gpuqueue.models import OutcomeStats, Task, TaskStatus
from gpuqueue.store.limits_rows import LimitsRow

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

BUCKET_SECONDS = 300
WINDOW_SECONDS = 3600
MAX_SHARDS = 7  # (WINDOW / BUCKET + 1) x shards keys must fit one BatchGetItem (100)
BATCH_GET_ROUNDS = 4  # tries for unprocessed keys (throttling)

# The attribute each final state counts in.
_OUTCOME_FIELDS = {
    TaskStatus.DONE: "succeeded",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELED: "canceled",
    TaskStatus.EXPIRED: "expired",
}


@dataclass(frozen=True)
class TaskEnd:
    task_id: str
    outcome: TaskStatus
    at: float  # epoch seconds
    processing_seconds: float | None = None


@dataclass(frozen=True)
class OutcomeWindow:
    """Sums over some buckets of the rows' fields (plain arithmetic, no AWS)."""

    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0
    processing_ms: int = 0  # summed over the succeeded tasks that ran
    processed: int = 0  # how many tasks that sum covers

    @classmethod
    def of_rows(cls, rows: list[Mapping[str, Any]]) -> OutcomeWindow:
        def total(name: str) -> int:
            return sum(int(row.get(name, 0)) for row in rows)

        return cls(
            succeeded=total("succeeded"),
            failed=total("failed"),
            canceled=total("canceled"),
            expired=total("expired"),
            processing_ms=total("processing_ms"),
            processed=total("processed"),
        )

    def stats(self, *, window_seconds: int) -> OutcomeStats:
        finished = self.succeeded + self.failed
        return OutcomeStats(
            window_seconds=window_seconds,
            succeeded=self.succeeded,
            failed=self.failed,
            canceled=self.canceled,
            expired=self.expired,
            # Of the tasks that ran to an end; cancels and queue deadlines are the users'.
            failure_rate=round(100.0 * self.failed / finished, 2) if finished else 0.0,
            avg_processing_seconds=(
                round(self.processing_ms / self.processed / 1000, 3) if self.processed else None
            ),
        )


def bucket_start(at: float) -> int:
    return int(at) // BUCKET_SECONDS * BUCKET_SECONDS


def window_buckets(now: float) -> list[int]:
    """The bucket starts read for the last hour: the current bucket and the 12 before it."""
    current = bucket_start(now)
    count = WINDOW_SECONDS // BUCKET_SECONDS
    return [current - i * BUCKET_SECONDS for i in range(count + 1)]


class OutcomeCounters:
    def __init__(self, table: Table, *, shards: int = 4) -> None:
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be between 1 and {MAX_SHARDS}")
        self._table = table
        self.shards = shards

    def key(self, bucket: int, shard: int) -> str:
        return LimitsRow.OUTCOMES.key(f"{bucket}#{shard}")

    def record(
        self,
        task_id: str,
        outcome: TaskStatus,
        *,
        at: float,
        processing_seconds: float | None = None,
    ) -> None:
        """Count one task's end (in the bucket of `at`, on the shard its id hashes to)."""
        self.record_many([TaskEnd(task_id, outcome, at, processing_seconds)])

    def record_many(self, ends: Sequence[TaskEnd]) -> None:
        """Count a stream batch's ends: one write per 5-minute bucket they fall in (on the
        shard the bucket's first task id hashes to), not one per task."""
        sums: dict[int, tuple[str, dict[str, int]]] = {}
        for end in ends:
            field = _OUTCOME_FIELDS.get(end.outcome)
            if field is None:
                raise ValueError(f"{end.outcome} is not a final state")
            bucket = bucket_start(end.at)
            _, adds = sums.setdefault(bucket, (end.task_id, {}))
            adds[field] = adds.get(field, 0) + 1
            if end.processing_seconds is not None and end.processing_seconds >= 0:
                adds["processing_ms"] = adds.get("processing_ms", 0) + round(
                    end.processing_seconds * 1000
                )
                adds["processed"] = adds.get("processed", 0) + 1
        for bucket, (first_id, adds) in sums.items():
            self._table.update_item(
                Key={"pk": self.key(bucket, zlib.crc32(first_id.encode()) % self.shards)},
                # Names through placeholders: some (`processed`) are DynamoDB reserved words.
                UpdateExpression="ADD "
                + ", ".join(f"#{name} :{name}" for name in adds)
                + " SET expires_at = if_not_exists(expires_at, :expires)",
                ExpressionAttributeNames={f"#{name}": name for name in adds},
                ExpressionAttributeValues={f":{name}": value for name, value in adds.items()}
                | {":expires": bucket + WINDOW_SECONDS + 2 * BUCKET_SECONDS},
            )

    def last_hour(self, now: float) -> OutcomeStats:
        """One BatchGetItem over every shard of every bucket in the window."""
        keys = [
            {"pk": self.key(bucket, shard)}
            for bucket in window_buckets(now)
            for shard in range(self.shards)
        ]
        rows: list[Mapping[str, Any]] = []
        # The resource's client converts Python values both ways (it is not the raw client).
        client: Any = self._table.meta.client
        for _ in range(BATCH_GET_ROUNDS):
            if not keys:
                break
            answer = client.batch_get_item(RequestItems={self._table.name: {"Keys": keys}})
            rows.extend(answer.get("Responses", {}).get(self._table.name, []))
            keys = list(answer.get("UnprocessedKeys", {}).get(self._table.name, {}).get("Keys", []))
        return OutcomeWindow.of_rows(rows).stats(window_seconds=WINDOW_SECONDS)


def _epoch(iso_time: str | None) -> float | None:
    if not iso_time:
        return None
    try:
        return datetime.fromisoformat(iso_time).timestamp()
    except ValueError:
        return None


class OutcomeRecorder:
    """The tasks stream's listener: counts each task that reached a final state."""

    def __init__(self, counters: OutcomeCounters) -> None:
        self._counters = counters

    def tasks_ended(self, tasks: Sequence[Task]) -> None:
        ends = [end for end in map(_end_of, tasks) if end is not None]
        if ends:
            self._counters.record_many(ends)

    def task_ended(self, task: Task) -> None:
        self.tasks_ended([task])


def _end_of(task: Task) -> TaskEnd | None:
    ended = _epoch(task.updated_at)
    if ended is None:
        return None
    started = _epoch(task.started_at)
    processing = ended - started if task.status is TaskStatus.DONE and started is not None else None
    return TaskEnd(task.task_id, task.status, ended, processing)
