"""The webhook signature: `X-Gpuqueue-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]`, each
v1 an HMAC-SHA256 of `f"{t}.".encode() + body` under one of the stack's signing secrets (the
current one, and the previous one while a rotation settles). Receivers check one matches and
that t is within 5 minutes (replay protection)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from typing import Any

SIGNATURE_HEADER = "X-Gpuqueue-Signature"


def sign(secrets: Sequence[str], body: bytes, *, timestamp: int) -> str:
    """The X-Gpuqueue-Signature value: one v1 per secret (current first)."""
    signed = f"{timestamp}.".encode() + body
    parts = [f"t={timestamp}"]
    parts += [
        "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets
    ]
    return ",".join(parts)


class SigningSecrets:
    """The stack's signing secrets from Secrets Manager: AWSCURRENT, and AWSPREVIOUS while a
    rotation settles (both sign, so receivers can switch at their own pace). Cached per
    container for `ttl_seconds`, so a rotation is picked up within that time."""

    def __init__(
        self,
        client: Any,
        secret_id: str,
        *,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._secret_id = secret_id
        self._ttl = ttl_seconds
        self._clock = clock
        self._cached: tuple[float, list[str]] | None = None

    def __call__(self) -> list[str]:
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < self._ttl:
            return self._cached[1]
        secrets = [self._value("AWSCURRENT")]
        try:
            previous = self._value("AWSPREVIOUS")
        except self._client.exceptions.ResourceNotFoundException:
            previous = None  # never rotated
        if previous and previous not in secrets:
            secrets.append(previous)
        self._cached = (now, secrets)
        return secrets

    def _value(self, stage: str) -> str:
        answer = self._client.get_secret_value(SecretId=self._secret_id, VersionStage=stage)
        return str(answer["SecretString"])
