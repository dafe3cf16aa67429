"""RateLimiter: a per-user token bucket in DynamoDB, exact under concurrent takes.

Each user has one item, key `rate#<user id>`, holding `tokens` (a number, whole tokens or
fractions of one), `updated_at` (epoch seconds when `tokens` was true) and `expires_at` (a TTL
attribute: the bucket is full again by then, so an idle user's row may disappear). Nothing
refills the row in the background: a take works the refill out from the time since
`updated_at`:

    available = min(burst, tokens + (now - updated_at) * rate)

Enough tokens: write `available - cost` and `updated_at = now`, on condition that the row
still holds the `tokens` and `updated_at` this take read (`attribute_not_exists` for a
user's first take). DynamoDB's update expressions only add and subtract, so the capped
refill cannot be one UpdateItem; the read + conditional write is optimistic concurrency
instead, and no two takes can spend the same token. The pair (updated_at, tokens) never
repeats: `updated_at` never moves back (a container whose clock lags another's refills
nothing) and when it stays put, `tokens` falls. So a condition that still holds means that
nobody wrote in between (no ABA).

Not enough tokens: denied, nothing written; `retry_after_seconds` says when `cost` tokens
will exist.

Contention: a write that loses its condition rereads and tries again, after a jittered
pause of a few milliseconds, up to `max_attempts` times (5). A take that loses every round
on one user's bucket is DENIED (fail closed, `retry_after_seconds` 1, `contended` set)
rather than allowed unchecked: only a user hammering their own bucket hits this, and a
retry a second later is cheap, whereas failing open would let exactly that user through.
Errors other than a lost condition (throttling, network) propagate: the caller chooses.

Cost: an allowed take is 1 strongly consistent read (1 RCU) + 1 write (1 WCU); a denied
take is 1 read; every lost round adds 1 read + 1 failed conditional write (billed as a
write).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

KEY_PREFIX = "rate#"
DEFAULT_MAX_ATTEMPTS = 5
# Kept after the bucket is full again, before TTL may remove an idle user's row.
TTL_MARGIN_SECONDS = 60
# A lost round waits up to this many seconds times the round number (jittered).
RETRY_PAUSE_SECONDS = 0.005
# Stored precision: time to the millisecond, tokens to the millionth.
TIME_DIGITS = 3
TOKEN_DIGITS = 6


@dataclass(frozen=True)
class RateDecision:
    """One take's outcome, in the numbers the X-RateLimit-* and Retry-After headers carry."""

    allowed: bool
    limit: int  # the burst: a full bucket
    remaining: int  # whole tokens left after this take
    retry_after_seconds: int  # 0 if allowed; else whole seconds until `cost` tokens exist
    reset_seconds: int  # whole seconds until the bucket is full again
    contended: bool = False  # denied only because other takes kept winning the write


def refill(tokens: float, updated_at: float, now: float, rate: float, burst: int) -> float:
    """Tokens in the bucket at `now`. A clock behind `updated_at` refills nothing.

    Times are kept to the millisecond; so is the elapsed time (at epoch scale a float
    difference carries ~1e-7 s of noise).
    """
    elapsed = max(0.0, round(now - updated_at, TIME_DIGITS))
    return round(min(float(burst), tokens + elapsed * rate), TOKEN_DIGITS)


def decision(available: float, *, cost: int, rate: float, burst: int) -> RateDecision:
    """Take `cost` of `available` tokens, or explain when that will be possible."""
    allowed = available >= cost
    left = round(available - cost if allowed else available, TOKEN_DIGITS)
    retry_after = 0 if allowed else max(1, _ceil_seconds((cost - available) / rate))
    return RateDecision(
        allowed=allowed,
        limit=burst,
        remaining=max(0, math.floor(left)),
        retry_after_seconds=retry_after,
        reset_seconds=_ceil_seconds((burst - left) / rate),
    )


def _ceil_seconds(seconds: float) -> int:
    # Rounded first, so float noise (2.0000000001) does not add a whole second.
    return max(0, math.ceil(round(seconds, TOKEN_DIGITS)))


def _num(value: float, digits: int) -> Decimal:
    return Decimal(str(round(value, digits)))


def _is_conditional_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class RateLimiter:
    def __init__(
        self,
        table: Table,
        *,
        rate_per_second: float,
        burst: int,
        clock: Callable[[], float] = time.time,
        key_attribute: str = "pk",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        rng: random.Random | None = None,
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._table = table
        self._rate = rate_per_second
        self._burst = burst
        self._clock = clock
        self._key = key_attribute
        self._max_attempts = max_attempts
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets

    @property
    def burst(self) -> int:
        return self._burst

    @property
    def rate_per_second(self) -> float:
        return self._rate

    def take(self, user_id: str, *, cost: int = 1) -> RateDecision:
        """Spend `cost` tokens from the user's bucket if they are there; never partially."""
        if not 1 <= cost <= self._burst:
            raise ValueError(f"cost must be between 1 and the burst ({self._burst})")
        key = KEY_PREFIX + user_id
        available = float(self._burst)
        for attempt in range(1, self._max_attempts + 1):
            outcome = self._try_take(key, cost)
            if isinstance(outcome, RateDecision):
                return outcome
            available = outcome
            if attempt < self._max_attempts:
                time.sleep(self._rng.uniform(0, RETRY_PAUSE_SECONDS * attempt))
        # Lost every round: deny (fail closed), ask for a retry in a second.
        latest = decision(available, cost=cost, rate=self._rate, burst=self._burst)
        return RateDecision(
            allowed=False,
            limit=self._burst,
            remaining=0,
            retry_after_seconds=1,
            reset_seconds=latest.reset_seconds,
            contended=True,
        )

    def _try_take(self, key: str, cost: int) -> RateDecision | float:
        """One read-compute-write round: the decision, or the tokens seen if the write lost."""
        now = round(self._clock(), TIME_DIGITS)
        item = self._table.get_item(Key={self._key: key}, ConsistentRead=True).get("Item")
        names = {"#k": self._key}
        values: dict[str, Any] = {}
        if item is None:
            available = float(self._burst)
            condition = "attribute_not_exists(#k)"
        else:
            seen_tokens, seen_at = item["tokens"], item["updated_at"]
            updated_at = float(str(seen_at))
            now = max(now, updated_at)  # updated_at never moves back: no ABA on the condition
            available = refill(float(str(seen_tokens)), updated_at, now, self._rate, self._burst)
            condition = "attribute_exists(#k) AND #t = :seen_tokens AND #u = :seen_at"
            names |= {"#t": "tokens", "#u": "updated_at"}
            values = {":seen_tokens": seen_tokens, ":seen_at": seen_at}
        result = decision(available, cost=cost, rate=self._rate, burst=self._burst)
        if not result.allowed:
            return result
        write: dict[str, Any] = {
            "Item": {
                self._key: key,
                "tokens": _num(available - cost, TOKEN_DIGITS),
                "updated_at": _num(now, TIME_DIGITS),
                "expires_at": math.ceil(now + self._burst / self._rate + TTL_MARGIN_SECONDS),
            },
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
        }
        if values:
            write["ExpressionAttributeValues"] = values
        try:
            self._table.put_item(**write)
        except ClientError as error:
            if _is_conditional_failure(error):
                return available
            raise
        return result
