"""ActiveTaskShare: at most K active tasks per user, exact under concurrent submits.

Each user's row in the limits table, key `active#<user id>`, holds the ids of their active
tasks (not yet DONE, FAILED, CANCELED or EXPIRED) as a string set.

- Taking a share is one UpdateItem: ADD the task id, on condition that the set holds fewer
  than K ids. DynamoDB applies the condition and the write atomically, so K+1 concurrent
  submits can never all pass, whatever their interleaving.
- Releasing is a DELETE of the id from the set. It is idempotent, so whoever releases may
  do it twice: the tasks table's stream (at-least-once delivery) drives it on every
  transition into a final state, whatever path got there (the dispatcher, a cancel, a
  retry's last attempt, a dead-lettered message, a queue deadline).
- A set that is full is checked before a submit is refused: ids whose task has ended or
  is gone are dropped (a release still on its way down the stream, or a crash between
  two writes), then the take is tried once more. So a refusal always means K tasks that
  really are active, and a counter can never leak a share for good.

New accounts: with a Probation, a user first seen (their first take: `first_seen`, set in
the same write with if_not_exists) less than its hours ago holds at most its lower limit;
the condition picks the limit from the row, so this is exact too and costs nothing more.

Cost: 1 write per take, and 1 per owner per stream batch of releases; a refusal at the
limit adds 1 read of the row and 1 BatchGetItem over its K tasks. With a RateLimiter
(`take(..., rate=)`), that one write also takes the submit's rate token (the limiter's tat
lives in this row): a submit is admitted in 1 request, not 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Set
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from gpuqueue.errors import ActiveTaskLimit, NewAccountLimit
from gpuqueue.intake.rate_limiter import (
    Probation,
    RateDecision,
    RateLimiter,
    ShareClause,
    ShareFull,
    to_millis,
)
from gpuqueue.store.dynamodb_conditions import is_conditional_failure, refused_item
from gpuqueue.store.limits_rows import LimitsRow
from gpuqueue.store.sdk_errors import raises_store_error

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table


# Given task ids, the ones that no longer hold a share (ended, or gone).
InactiveFinder = Callable[[Collection[str]], Set[str]]


class ActiveTaskShare:
    def __init__(
        self,
        table: Table,
        *,
        limit: int,
        find_inactive: InactiveFinder | None = None,
        probation: Probation | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`find_inactive` checks a full set before a refusal; without it (a caller that only
        releases) a full set refuses as it stands. `probation`: new users' lower limit."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._table = table
        self.limit = limit
        self._find_inactive = find_inactive
        self._probation = probation if probation and probation.seconds > 0 else None
        self._clock = clock

    @raises_store_error("limits table")
    def take(
        self, owner: str, task_id: str, *, rate: RateLimiter | None = None
    ) -> RateDecision | None:
        """Count `task_id` as one of the owner's active tasks, or raise ActiveTaskLimit.
        With `rate` (keyed on this row), the same write takes the rate token: its decision
        is returned, and a denied one counted nothing."""
        try:
            return self._add(owner, task_id, rate)
        except ShareFull as full:
            active, first_seen = full.active, full.first_seen
            if not active:
                active, first_seen = self._row(owner)
        stale = set(self._find_inactive(sorted(active))) & active if self._find_inactive else set()
        if stale:
            self._remove(owner, stale)
            try:
                return self._add(owner, task_id, rate)
            except ShareFull as full:
                first_seen = full.first_seen or first_seen
        raise self._refusal(first_seen)

    def _refusal(self, first_seen: Decimal | None) -> ActiveTaskLimit:
        """The limit that applies to this row: a new account's while it is new."""
        probation = self._probation
        if probation is not None and first_seen is not None and probation.limit < self.limit:
            established_at = float(first_seen) + probation.seconds
            if established_at > self._clock():
                return NewAccountLimit(
                    f"new accounts may have at most {probation.limit} active (queued or "
                    f"running) tasks during their first {probation.seconds / 3600:g} h "
                    f"(at most {self.limit} after); wait for one to finish or cancel one",
                    limit=probation.limit,
                )
        return ActiveTaskLimit(
            f"at most {self.limit} active (queued or running) tasks per user; wait for one "
            "to finish or cancel one",
            limit=self.limit,
        )

    @raises_store_error("limits table")
    def release(self, owner: str, task_id: str) -> None:
        """Stop counting the task. Releasing an id that is not counted does nothing."""
        self._remove(owner, {task_id})

    @raises_store_error("limits table")
    def release_many(self, owner: str, task_ids: Set[str]) -> None:
        """Stop counting several of the owner's tasks: one write."""
        if task_ids:
            self._remove(owner, task_ids)

    def active(self, owner: str) -> set[str]:
        return self._row(owner)[0]

    def _row(self, owner: str) -> tuple[set[str], Decimal | None]:
        """The ids the owner's row counts, and when they were first seen."""
        item: dict[str, Any] = (
            self._table.get_item(
                Key={"pk": LimitsRow.ACTIVE_SHARE.key(owner)},
                ConsistentRead=True,
                ProjectionExpression="active, first_seen",
            ).get("Item")
            or {}
        )
        first_seen = item.get("first_seen")
        ids = {str(task_id) for task_id in item.get("active", set())}
        return ids, None if first_seen is None else Decimal(str(first_seen))

    def _add(self, owner: str, task_id: str, rate: RateLimiter | None) -> RateDecision | None:
        """One write; ShareFull when the share is full (with the ids held, when known)."""
        clause = ShareClause(task_id, self.limit, self._probation)
        if rate is not None:
            return rate.take(owner, share=clause)
        share_set, condition, names, values = clause.expression(to_millis(self._clock()))
        update = ("SET " + share_set + " " if share_set else "") + "ADD #active :ids"
        try:
            self._table.update_item(
                Key={"pk": LimitsRow.ACTIVE_SHARE.key(owner)},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise
            old = refused_item(error) or {}
            first_seen = old.get("first_seen")
            raise ShareFull(
                {str(i) for i in old.get("active", set())},
                None if first_seen is None else Decimal(str(first_seen)),
            ) from None
        return None

    def _remove(self, owner: str, task_ids: Set[str]) -> None:
        # DynamoDB drops an attribute whose set becomes empty, so the row stays small; the
        # condition keeps a release for a user with no row from creating an empty one.
        try:
            self._table.update_item(
                Key={"pk": LimitsRow.ACTIVE_SHARE.key(owner)},
                UpdateExpression="DELETE active :ids",
                ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeValues={":ids": set(task_ids)},
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise
