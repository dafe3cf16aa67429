"""The limits table's row types, each by the prefix of its key (`pk`): declared together so
that no two types can share a key.

A row's key is its type's prefix followed by what the row is about (a user, a lane, a
source address...). One more kind of row lives there without a prefix of ours: the
`Idempotency-Key` records, written by Powertools under `<function name>.<function>#<hash>`
(idempotent_submit.py). Lambda function names hold no "." and no "#", so as long as no
prefix below has a "." before its "#", no record can be taken for one of these rows.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class LimitsRow(StrEnum):
    """A row type of the limits table; its value is its keys' prefix."""

    # A token bucket (GCRA) per user, without a share: RateLimiter's own rows.
    RATE = "rate#"
    # Per user: their active task ids, their submit-rate bucket beside them, and when they
    # were first seen (the new-account limit).
    ACTIVE_SHARE = "active#"
    # Per lane: the waiting line's ticket counters and departure gaps (queue positions).
    LANE = "lane#"
    # Per 5-minute bucket and shard: how tasks ended (the last hour's outcomes).
    OUTCOMES = "outcomes#"
    # The `Prefer: wait` seats, one row each.
    WAIT_SEAT = "wait-seat#"
    # Sign-in throttle buckets: failed logins per username and per source, sign-ups per source.
    LOGIN_USERNAME = "login-user#"
    LOGIN_SOURCE = "login-source#"
    REGISTER_SOURCE = "register-source#"
    # Webhook redeliveries asked for, per task and per user.
    REDELIVER_TASK = "redeliver-task#"
    REDELIVER_USER = "redeliver-user#"

    def key(self, subject: str) -> str:
        """The key of this type's row about `subject`."""
        return f"{self.value}{subject}"
