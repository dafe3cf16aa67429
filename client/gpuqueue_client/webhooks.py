"""Sign and verify gpuqueue webhook deliveries (the standard library only: copy it freely).

A delivery is a POST whose header `X-Gpuqueue-Signature: t=<unix seconds>,v1=<hex>` holds
HMAC-SHA256(secret, f"{t}.".encode() + raw_body) in hex. During a secret rotation there are
several `v1=` values (the current and the previous secret): one match is enough. Verify the
raw bytes as received (before any JSON parsing), and refuse a timestamp more than
`tolerance_seconds` from now, so a captured delivery cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence

SIGNATURE_HEADER = "X-Gpuqueue-Signature"
EVENT_HEADER = "X-Gpuqueue-Event"
DELIVERY_HEADER = "X-Gpuqueue-Delivery"
DEFAULT_TOLERANCE_SECONDS = 300

MALFORMED_HEADER = "malformed header"
TIMESTAMP_OUTSIDE_TOLERANCE = "timestamp outside tolerance"
SIGNATURE_MISMATCH = "signature mismatch"

_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


class WebhookVerificationError(ValueError):
    """A delivery that must be refused; `reason` is one of the three constants above."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sign(secret: str | Sequence[str], body: bytes, *, timestamp: int) -> str:
    """The `X-Gpuqueue-Signature` value for `body`: one `v1=` per secret, in the given order."""
    digests = (f"v1={_digest(key, timestamp, body)}" for key in _secrets(secret))
    return ",".join((f"t={int(timestamp)}", *digests))


def verify(
    secrets: str | Sequence[str],
    header: str,
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether `header` is a valid, fresh signature of `body` by one of `secrets`."""
    try:
        verify_or_raise(secrets, header, body, tolerance_seconds=tolerance_seconds, now=now)
    except WebhookVerificationError:
        return False
    return True


def verify_or_raise(
    secrets: str | Sequence[str],
    header: str,
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> int:
    """Like `verify`, but raise WebhookVerificationError (with the reason); returns `t`."""
    keys = _secrets(secrets)
    if tolerance_seconds < 0:
        raise ValueError("tolerance_seconds must not be negative")
    timestamp, signatures = _parse(header)
    expected = [_digest(key, timestamp, body) for key in keys]
    # Every pair is compared (no early exit), each in constant time.
    matched = False
    for signature in signatures:
        for digest in expected:
            matched |= hmac.compare_digest(signature, digest)
    if not matched:
        raise WebhookVerificationError(SIGNATURE_MISMATCH)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise WebhookVerificationError(TIMESTAMP_OUTSIDE_TOLERANCE)
    return timestamp


def _secrets(secrets: str | Sequence[str]) -> list[str]:
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not keys or not all(isinstance(key, str) and key for key in keys):
        raise ValueError("at least one non-empty webhook secret is needed")
    return keys


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    message = f"{int(timestamp)}.".encode() + bytes(body)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _parse(header: str) -> tuple[int, list[str]]:
    """(t, [v1, ...]) of a header value; other schemes (v0=, v2=) are ignored."""
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise WebhookVerificationError(MALFORMED_HEADER)
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            if not _HEX_DIGEST.fullmatch(value):
                raise WebhookVerificationError(MALFORMED_HEADER)
            signatures.append(value.lower())
    if len(timestamps) != 1 or not timestamps[0].isascii() or not timestamps[0].isdigit():
        raise WebhookVerificationError(MALFORMED_HEADER)
    if not signatures:
        raise WebhookVerificationError(MALFORMED_HEADER)
    return int(timestamps[0]), signatures
