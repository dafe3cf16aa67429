"""Test support shared by every suite: a fake LambdaContext, sample events, waiting."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import hmac
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS = Path(__file__).resolve().parents[1] / "events"
# Stack parameters for tests where one user stands for many (a lane filled, many tasks
# queued by one caller): no per-user share of the capacity, no new-account limit.
# tests/integration/test_admission.py tests those at their defaults.
ONE_USER_MAY_FILL_THE_QUEUE = {"UserQueueSharePercent": "100", "NewAccountHours": "0"}


@dataclass
class User:
    """A signed-in caller as the API's authorizer passes them on (Cognito's sub and name)."""

    sub: str
    username: str
    groups: tuple[str, ...] = ()


@dataclass
class FakeLambdaContext:
    """Enough of LambdaContext for Powertools; remaining time follows the given timeout."""

    function_name: str = "test-function"
    timeout_seconds: float = 30.0
    memory_limit_in_mb: int = 512
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    @property
    def function_version(self) -> str:
        return "$LATEST"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return "2026/01/27/[$LATEST]0123456789abcdef"

    def get_remaining_time_in_millis(self) -> int:
        elapsed = time.monotonic() - self._started
        return max(0, int((self.timeout_seconds - elapsed) * 1000))


@contextlib.contextmanager
def dynamodb_operations(client: Any) -> Iterator[list[str]]:
    """The DynamoDB operations (`Query`, `Scan`, ...) `client` sends inside the block."""
    operations: list[str] = []

    def count(event_name: str, **_: Any) -> None:
        operations.append(event_name.rsplit(".", maxsplit=1)[-1])

    client.meta.events.register("before-call.dynamodb.*", count)
    try:
        yield operations
    finally:
        client.meta.events.unregister("before-call.dynamodb.*", count)


class RacingTable:
    """A DynamoDB table on which another writer gets in first: the writes given to `race`
    run (against the real table) one before each of this table's next `update_item` calls,
    in order, as a concurrent worker's write landing between our read and our conditional
    write would (None: that update goes through alone). Every other call goes straight to
    the real table."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self._writes: list[Callable[[], Any] | None] = []

    def race(self, *writes: Callable[[], Any] | None) -> RacingTable:
        self._writes.extend(writes)
        return self

    @property
    def pending(self) -> int:
        """Competing writes not yet made."""
        return len(self._writes)

    def update_item(self, **kwargs: Any) -> Any:
        write = self._writes.pop(0) if self._writes else None
        if write is not None:
            write()
        return self._table.update_item(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)


def load_event(name: str) -> dict[str, Any]:
    """A sample event from events/, the same file `sam local invoke` uses (a fresh copy)."""
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return copy.deepcopy(data)


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll a condition until it is truthy or the deadline passes (no bare sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


@functools.cache
def speak_wav(text: str) -> bytes:
    """`text` spoken by espeak-ng's American English voice (PocketSphinx's model is en-us),
    as WAV bytes. Fails, never skips, without espeak-ng: CI installs it."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise AssertionError(
            "espeak-ng is not installed: run tools/install_system_packages.sh "
            "(the speech tests need it to make real speech; `make test` installs it)"
        )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run([espeak, "-v", "en-us", "-w", str(path), text], check=True, timeout=60)
        return path.read_bytes()


# --- webhook receivers ------------------------------------------------------------------------


def valid_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check of X-Gpuqueue-Signature, written apart from the server's code."""
    fields = [part.split("=", 1) for part in headers["x-gpuqueue-signature"].split(",")]
    timestamp = next(v for k, v in fields if k == "t")
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return any(hmac.compare_digest(v, digest.hexdigest()) for k, v in fields if k == "v1")
