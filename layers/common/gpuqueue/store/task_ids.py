"""Task ids: UUIDv7 (RFC 9562), a UUID string like the seed's whose first 48 bits are the
Unix time in milliseconds at which the id was issued.

The issue time lets a reader tell an id that was just handed out (its task row is still
being written) from one whose row will never come (a submit that crashed between taking
a share and writing the task): see `TaskStore.inactive_among`.
"""

from __future__ import annotations

import os
import time
import uuid


def new_task_id(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 of them used
    value = (millis << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def issued_at(task_id: str) -> float | None:
    """The Unix time a UUIDv7 id was issued; None for any other id (older ids were v4)."""
    try:
        parsed = uuid.UUID(task_id)
    except ValueError:
        return None
    if parsed.version != 7:
        return None
    return (parsed.int >> 80) / 1000
