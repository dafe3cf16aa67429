"""RateLimiter: a per-user token bucket in DynamoDB, kept as GCRA: atomic, no read, no rounds.

The bucket (`rate_per_second` r, `burst` b) is stored as GCRA, the generic cell rate
algorithm: one number per user, the theoretical arrival time `tat` (epoch seconds), in the
row `rate#<user id>` beside `expires_at` (a TTL attribute). With the emission interval
T = 1/r and the tolerance tau = b * T, the bucket at `now` holds

    tokens = (now + tau - max(tat, now)) / T        (b when tat <= now: full)

so nothing refills in the background and nothing is read to refill: a take of `cost` c is
allowed iff  max(tat, now) + c*T - now <= tau,  and then  tat := max(tat, now) + c*T.
This is exactly the token bucket: the test suite replays random arrivals against both.

Two conditional writes. An update expression cannot take max(), so each side of it is one
UpdateItem whose condition says that side is the one that applies, checked by DynamoDB
atomically with the write:

    IDLE  SET tat = :now + c*T      IF attribute_not_exists(tat) OR tat < :now
    BUSY  SET tat = tat + c*T       IF tat >= :now AND tat <= :limit  (limit = now + tau - c*T)
    DENY  (no write)                   tat > limit

For one `now` exactly one of the three holds, so a write that succeeds is GCRA applied to the
tat of that instant; concurrent takes are ordered by DynamoDB on the item, and none spends a
token another has spent. A write that fails brings the row back
(ReturnValuesOnConditionCheckFailure=ALL_OLD), whose tat says which case holds now. tat only
grows (every write moves it up by at least c*T), so: IDLE failed means tat >= now for good,
leaving BUSY or DENY; BUSY failed means tat > limit (or tat < now, reachable only after the
row is deleted under the take), and tat > limit is final: denied. An allowed take therefore
needs at most 2 writes and no read however many takes race it: no optimistic retry rounds, no
denial for contention.

Which write first: the limiter remembers, per user, the last tat it saw (its own write or a
failed write's ALL_OLD) and puts the same three-way test to it. An unknown or idle user
(the common case at a low rate) starts with IDLE, a user in the middle of a burst with BUSY,
and a user whose remembered tat is already past the limit is denied without any request
(exact, as tat only grows: both writes would fail). A wrong guess costs one failed write,
which returns the truth. A fixed order would pay 2 writes on every take of a burst (IDLE
first) or on every occasional submit (BUSY first); the hint pays 1 for both from a warm
container. Hints are per limiter (per Lambda container), bounded, and never needed for
correctness; one lower than the stored tat (another container wrote since) only costs a
guess. The one thing a hint does not see is a row deleted by hand to lift a user's limit:
a container that had seen that user past the limit keeps denying locally until its hint
falls back within it (at most tau).

Cost per take: allowed, 1 write (2 when the first guess was wrong: 1 failed conditional
write, billed as a write, then 1 successful one). Denied, 1 failed conditional write (2 when
a rival's write moved the row between IDLE failing and BUSY), or none when this container
already saw the row past the limit. No reads, unless a failed write brings back no row (the
row was deleted under the take, or a DynamoDB-compatible store ignores
ReturnValuesOnConditionCheckFailure): then one consistent GetItem reads its tat. Only if the
row is deleted under the take twice does it run out of its 3 writes; it is then denied with
Retry-After 1 (fail closed).

Header numbers (RateDecision): remaining = floor((now + tau - tat') / T), the whole tokens
left after the take (tat' the new tat); reset = ceil(tat' - now), seconds until the bucket
is full; on a denial, retry_after = ceil(tat + c*T - tau - now), at least 1: the first
moment the take would be allowed, tat being the stored one.

TTL: expires_at = ceil(tat) + 60 s, an instant by which the bucket is full again, so an idle
user's row may go (a missing row reads as a full bucket). The BUSY write cannot know the new
tat before writing it, so it stores ceil(now + tau) + 60, an upper bound (tat <= limit).

Clock skew between containers: every decision uses the deciding container's own clock.
A container whose clock lags by d cannot refill early: to it the stored tat lies d further
in the future, so it denies up to r*d tokens sooner and quotes a Retry-After up to d too
long. Its IDLE writes, though, are dated d early, which a correct clock reads as up to
min(c, r*d) tokens more than a true bucket would hold; a container whose clock leads by d
refills early by up to r*d tokens. The error is bounded, not cumulative: every allowed take
raises tat by at least c*T and tat never exceeds (the writer's now) + tau, so over any
window W the user gets at most r*W + b + r*D tokens, D the spread between the slowest and
fastest clocks (Lambda clocks are NTP-synced: milliseconds).

Numbers: `now` is taken to the millisecond and T to the microsecond (so the bucket is
exactly one of rate 1/T; 1/r itself whenever that is a whole number of microseconds), all
as Decimal, which DynamoDB stores and adds exactly: the arithmetic has no float noise.
Rows written by the earlier read-and-write token bucket (`tokens`, `updated_at`) have no
tat: their next take sees a full bucket, and the old attributes stay until the row expires.

Errors other than a lost condition (throttling, network) propagate: the caller chooses.

With a share (`take(..., share=ShareClause(task_id, limit))`) the same write also counts the
task among the user's active tasks (ActiveTaskShare's row, `active#<user id>`, which then
holds tat too): `ADD active :id`, its condition `size(active) < limit` joined to the rate's
with AND. One request admits a submit where two did (a rate write, then a share write), and
a submit refused for its share no longer spends a token. A failed write's ALL_OLD tells
which side failed: if the stored tat still admits the step that was tried, the share did
(ShareFull, with the ids held). A clause with a Probation also sets `first_seen` (if_not_exists)
and lets a user first seen within its hours hold only its lower limit, chosen in the condition.
That row carries no expires_at: TTL must never delete ids that are still counted; a missing
or old tat reads as a full bucket anyway.

Refunds (`give_back`): a limiter built `refundable=True` may hand back tokens a take spent on
an attempt that turned out not to count (a login that succeeded: only failures are limited).
Spending first and refunding after, rather than checking first and spending after a failure,
keeps the bound exact under concurrency: N parallel attempts spend N tokens before any of
them reaches the guarded call. A refund is one UpdateItem, `SET tat = tat - c*T`: tat then no
longer only grows, so such a limiter treats a remembered tat past the limit as a guess and
confirms it with a write (a denial costs 1 failed write, never none) instead of denying from
memory: another container's refund may have lowered it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

from botocore.exceptions import ClientError

from gpuqueue.store.dynamodb_conditions import is_conditional_failure
from gpuqueue.store.limits_rows import LimitsRow
from gpuqueue.store.sdk_errors import raises_store_error

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

# Kept after the bucket is full again, before TTL may remove an idle user's row.
TTL_MARGIN_SECONDS = 60
# Stored precision: `now` to the millisecond, the emission interval to the microsecond.
TIME_DIGITS = 3
INTERVAL_DIGITS = 6
# 2 in any race; a third only for a row deleted under the take.
MAX_WRITES = 3
# Users whose last seen tat one limiter remembers (past it, the memory starts afresh).
HINTS_KEPT = 4096

_NAMES = {"#tat": "tat", "#exp": "expires_at"}


class Step(Enum):
    """Which side of max(tat, now) applies: the write to try, or none."""

    IDLE = "idle"  # no tat or tat < now: the bucket is full; tat := now + c*T
    BUSY = "busy"  # now <= tat <= limit: tat := tat + c*T
    DENY = "deny"  # tat > limit: not enough tokens


@dataclass(frozen=True)
class RateDecision:
    """One take's outcome, in the numbers the X-RateLimit-* and Retry-After headers carry."""

    allowed: bool
    limit: int  # the burst: a full bucket
    remaining: int  # whole tokens left after this take
    retry_after_seconds: int  # 0 if allowed; else whole seconds until `cost` tokens exist
    reset_seconds: int  # whole seconds until the bucket is full again


def to_millis(seconds: float) -> Decimal:
    """An epoch time as DynamoDB stores it here: a Decimal to the millisecond."""
    return Decimal(round(seconds * 10**TIME_DIGITS)).scaleb(-TIME_DIGITS)


@dataclass(frozen=True)
class Gcra:
    """The arithmetic, pure and exact (Decimal): a bucket of `burst` tokens, one token per
    `interval` seconds, as one theoretical arrival time."""

    interval: Decimal  # T, seconds per token
    burst: int

    @classmethod
    def for_rate(cls, rate_per_second: float, burst: int) -> Gcra:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        micros = round(10**INTERVAL_DIGITS / rate_per_second)
        if micros < 1:
            raise ValueError("rate_per_second must be at most a million")
        return cls(Decimal(micros).scaleb(-INTERVAL_DIGITS), burst)

    @property
    def tolerance(self) -> Decimal:
        """tau: how far tat may run ahead of now (a full bucket's worth of intervals)."""
        return self.interval * self.burst

    def increment(self, cost: int) -> Decimal:
        return self.interval * cost

    def limit(self, now: Decimal, cost: int) -> Decimal:
        """The highest tat a take of `cost` at `now` may start from."""
        return now + self.tolerance - self.increment(cost)

    def step(self, tat: Decimal | None, now: Decimal, cost: int) -> Step:
        if tat is None or tat < now:
            return Step.IDLE
        if tat <= self.limit(now, cost):
            return Step.BUSY
        return Step.DENY

    def take(self, tat: Decimal | None, now: Decimal, cost: int) -> tuple[RateDecision, Decimal]:
        """GCRA in one process: the decision and the tat after it. The limiter makes the
        same two moves as conditional writes."""
        step = self.step(tat, now, cost)
        if step is Step.DENY:
            assert tat is not None  # DENY implies a tat
            return self.denied(tat, now, cost), tat
        start = now if step is Step.IDLE or tat is None else tat
        new_tat = start + self.increment(cost)
        return self.allowed(new_tat, now), new_tat

    def allowed(self, new_tat: Decimal, now: Decimal) -> RateDecision:
        return RateDecision(
            allowed=True,
            limit=self.burst,
            remaining=self._whole_tokens(new_tat, now),
            retry_after_seconds=0,
            reset_seconds=self._reset(new_tat, now),
        )

    def denied(self, tat: Decimal, now: Decimal, cost: int) -> RateDecision:
        wait = tat + self.increment(cost) - self.tolerance - now
        return RateDecision(
            allowed=False,
            limit=self.burst,
            remaining=self._whole_tokens(tat, now),
            retry_after_seconds=max(1, math.ceil(wait)),
            reset_seconds=self._reset(tat, now),
        )

    def _whole_tokens(self, tat: Decimal, now: Decimal) -> int:
        tokens = (now + self.tolerance - max(tat, now)) / self.interval
        return min(self.burst, max(0, math.floor(tokens)))

    @staticmethod
    def _reset(tat: Decimal, now: Decimal) -> int:
        return max(0, math.ceil(tat - now))


@dataclass(frozen=True)
class Probation:
    """A user first seen less than `seconds` ago may hold at most `limit` active tasks."""

    limit: int
    seconds: float


@dataclass(frozen=True)
class ShareClause:
    """Also count `task_id` among the user's active tasks, if fewer than `limit` are (fewer
    than the probation's limit while the user is new)."""

    task_id: str
    limit: int
    probation: Probation | None = None

    def expression(self, now: Decimal) -> tuple[str, str, dict[str, str], dict[str, Any]]:
        """(SET clause, condition, names, values) that count the task in the row. The row
        records when its user was first seen (if_not_exists: the first take's time, no extra
        request); a row without it predates probation and counts as established."""
        names = {"#active": "active"}
        values: dict[str, Any] = {":ids": {self.task_id}, ":share_limit": self.limit}
        condition = "attribute_not_exists(#active) OR size(#active) < :share_limit"
        if self.probation is None or self.probation.limit >= self.limit:
            return "", condition, names, values
        names["#first"] = "first_seen"
        values[":now"] = now
        values[":new_limit"] = self.probation.limit
        values[":established"] = now - Decimal(str(self.probation.seconds))
        condition = (
            "attribute_not_exists(#active) OR size(#active) < :new_limit OR "
            "(size(#active) < :share_limit AND "
            "(attribute_not_exists(#first) OR #first <= :established))"
        )
        return "#first = if_not_exists(#first, :now)", condition, names, values


class ShareFull(Exception):
    """The rate admitted the take but the user's share was full: nothing was written.
    `first_seen`: when the row's user was first seen (None: unknown, or established before
    it was recorded)."""

    def __init__(self, active: set[str], first_seen: Decimal | None = None) -> None:
        super().__init__("active-task share full")
        self.active = active
        self.first_seen = first_seen


class _Lost(Exception):
    """A write's condition failed; `tat` is the stored one (None: no row), `active` the
    ids the row counted."""

    def __init__(
        self, tat: Decimal | None, active: set[str] | None = None, first_seen: Decimal | None = None
    ) -> None:
        super().__init__("condition failed")
        self.tat = tat
        self.active = active or set()
        self.first_seen = first_seen


class RateLimiter:
    def __init__(
        self,
        table: Table,
        *,
        rate_per_second: float,
        burst: int,
        clock: Callable[[], float] = time.time,
        key_attribute: str = "pk",
        rows: LimitsRow = LimitsRow.RATE,
        refundable: bool = False,
    ) -> None:
        """`rows`: the buckets' row type; ActiveTaskShare's when takes carry a share.
        `refundable`: `give_back` may lower a tat, so no denial comes from memory alone."""
        self._rows = rows
        self._refundable = refundable
        self._gcra = Gcra.for_rate(rate_per_second, burst)
        self._table = table
        self._rate = rate_per_second
        self._clock = clock
        self._key = key_attribute
        self._hints: dict[str, Decimal] = {}

    @property
    def burst(self) -> int:
        return self._gcra.burst

    @property
    def rate_per_second(self) -> float:
        return self._rate

    @property
    def gcra(self) -> Gcra:
        return self._gcra

    @raises_store_error("limits table")
    def take(
        self, user_id: str, *, cost: int = 1, share: ShareClause | None = None
    ) -> RateDecision:
        """Spend `cost` tokens from the user's bucket if they are there; never partially.
        With `share`, in the same write count the task among the user's active tasks, or
        raise ShareFull (no token spent); a denial takes no share."""
        if not 1 <= cost <= self._gcra.burst:
            raise ValueError(f"cost must be between 1 and the burst ({self._gcra.burst})")
        key = self._rows.key(user_id)
        now = to_millis(self._clock())
        tat = self._hints.get(key)
        # A refund elsewhere may have lowered the stored tat under a remembered one.
        confirmed = tat is None or not self._refundable
        for _ in range(MAX_WRITES):
            step = self._gcra.step(tat, now, cost)
            if step is Step.DENY:
                assert tat is not None  # DENY implies a tat
                if confirmed:
                    return self._gcra.denied(tat, now, cost)
                step = Step.BUSY  # its failure brings back the stored tat
            try:
                new_tat = self._write(step, key, now, cost, share)
            except _Lost as lost:
                confirmed = True
                tat = lost.tat
                self._remember(key, tat)
                if share is not None and self._gcra.step(tat, now, cost) is step:
                    raise ShareFull(lost.active, lost.first_seen) from None  # the rate held
                continue
            self._remember(key, new_tat)
            return self._gcra.allowed(new_tat, now)
        # The row was deleted under this take twice: fail closed. The last tat seen would
        # admit the take, so the Retry-After comes out at its minimum, 1 s.
        return self._gcra.denied(now if tat is None else tat, now, cost)

    @raises_store_error("limits table")
    def give_back(self, user_id: str, *, cost: int = 1) -> None:
        """Return `cost` tokens a take of this limiter spent (only for `refundable=True`).
        A row that is gone has nothing to return: the bucket reads as full already."""
        if not self._refundable:
            raise ValueError("give_back needs a limiter built with refundable=True")
        key = self._rows.key(user_id)
        try:
            response = self._table.update_item(
                Key={self._key: key},
                UpdateExpression="SET #tat = #tat - :dec",
                ConditionExpression="attribute_exists(#tat)",
                ExpressionAttributeNames={"#tat": "tat"},
                ExpressionAttributeValues={":dec": self._gcra.increment(cost)},
                ReturnValues="UPDATED_NEW",
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise
            self._hints.pop(key, None)
            return
        # Not _remember: its max() assumes tat only grows, which a refund breaks.
        self._hints[key] = Decimal(str(response["Attributes"]["tat"]))

    def headers_hint(self, user_id: str) -> RateDecision:
        """The bucket as this container last saw it (no request): the X-RateLimit-* numbers
        for an answer that took no token (an Idempotency-Key replay)."""
        now = to_millis(self._clock())
        tat = self._hints.get(self._rows.key(user_id))
        return self._gcra.allowed(now if tat is None else tat, now)

    def _write(
        self, step: Step, key: str, now: Decimal, cost: int, share: ShareClause | None = None
    ) -> Decimal:
        """One conditional UpdateItem: the new tat, or _Lost with the stored one."""
        increment = self._gcra.increment(cost)
        if step is Step.IDLE:
            new_tat = now + increment
            update = "SET #tat = :tat, #exp = :exp"
            condition = "attribute_not_exists(#tat) OR #tat < :now"
            values: dict[str, Any] = {
                ":tat": new_tat,
                ":now": now,
                ":exp": math.ceil(new_tat) + TTL_MARGIN_SECONDS,
            }
        else:
            update = "SET #tat = #tat + :inc, #exp = :exp"
            condition = "#tat >= :now AND #tat <= :limit"
            values = {
                ":inc": increment,
                ":now": now,
                ":limit": self._gcra.limit(now, cost),
                # The new tat is at most now + tau: a bound, as it is unknown before the write.
                ":exp": math.ceil(now + self._gcra.tolerance) + TTL_MARGIN_SECONDS,
            }
        names = dict(_NAMES)
        if share is not None:
            # The row holds counted ids: no expires_at, so TTL never deletes them.
            update = update.replace(", #exp = :exp", "")
            del names["#exp"], values[":exp"]
            share_set, share_condition, share_names, share_values = share.expression(now)
            if share_set:
                update += ", " + share_set
            update += " ADD #active :ids"
            names.update(share_names)
            values.update(share_values)
            condition = f"({condition}) AND ({share_condition})"
        try:
            response = self._table.update_item(
                Key={self._key: key},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="UPDATED_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise
            raise _Lost(
                self._stored_tat(error, key), _stored_ids(error), _stored_first_seen(error)
            ) from None
        return Decimal(str(response["Attributes"]["tat"]))

    def _stored_tat(self, error: ClientError, key: str) -> Decimal | None:
        """The tat a failed write found: from its ALL_OLD item, or read when none came back."""
        item = cast(dict[str, Any], error.response).get("Item")
        if item is not None:  # low-level format: the resource does not deserialize errors
            raw = item.get("tat")
            return Decimal(raw["N"]) if raw else None
        # No row any more, or a store that ignores ReturnValuesOnConditionCheckFailure.
        stored = self._table.get_item(
            Key={self._key: key},
            ConsistentRead=True,
            ProjectionExpression="#tat",
            ExpressionAttributeNames={"#tat": "tat"},
        ).get("Item")
        value = stored.get("tat") if stored else None
        return None if value is None else Decimal(str(value))

    def _remember(self, key: str, tat: Decimal | None) -> None:
        if tat is None:
            self._hints.pop(key, None)
            return
        if len(self._hints) >= HINTS_KEPT and key not in self._hints:
            self._hints.clear()
        known = self._hints.get(key)
        # tat only grows: of two sightings the higher is the later (threads may report late).
        # Not with refunds: the latest sighting is the best guess.
        self._hints[key] = tat if known is None or self._refundable else max(known, tat)


def _stored_ids(error: ClientError) -> set[str]:
    """The active ids in a failed write's ALL_OLD item (low-level format)."""
    item = cast(dict[str, Any], error.response).get("Item") or {}
    return set(item.get("active", {}).get("SS", []))


def _stored_first_seen(error: ClientError) -> Decimal | None:
    """When the user was first seen, from a failed write's ALL_OLD item (None: not recorded)."""
    item = cast(dict[str, Any], error.response).get("Item") or {}
    raw = item.get("first_seen", {}).get("N")
    return None if raw is None else Decimal(raw)
