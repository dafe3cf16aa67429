"""Make moto's DynamoDB conditional writes (and S3's conditional PutObject) atomic, as AWS's are.

moto checks a ConditionExpression and applies the write without a lock, so two concurrent
conditional writes on one item can both pass: measured here, 1 in 30 races of five
UpdateItems on a fresh key produced two winners. Everything that relies on a conditional
write (slot leases, task claims, per-user counters) would then be tested against a weaker
database than the one it runs on. One lock around every DynamoDB write closes that gap;
reads stay concurrent. The write returns a copy of the item taken under the lock: moto hands
back its live item, which a later write could change before the answer is serialised
(ReturnValues would then show another write's values; measured: two concurrent rate-limit
takes reporting the same remaining count).

`python -m gpuqueue_local.moto_atomic [moto.server args]` runs a moto server so patched.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from moto.dynamodb.models import DynamoDBBackend
from moto.s3.responses import S3Response
from moto.server import main as moto_main

_LOCK = threading.RLock()
_S3_LOCK = threading.RLock()  # S3 writes apart: a large upload never holds DynamoDB up
_WRITES = ("put_item", "update_item", "delete_item", "transact_write_items")
_MARK = "_gpuqueue_atomic"


def _serialised(method: Callable[..., Any], lock: threading.RLock = _LOCK) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return copy.deepcopy(method(*args, **kwargs))

    setattr(locked, _MARK, True)
    return locked


def install() -> None:
    """Patch the DynamoDB backend and S3's PutObject in this process (idempotent)."""
    for name in _WRITES:
        method = getattr(DynamoDBBackend, name)
        if not getattr(method, _MARK, False):
            setattr(DynamoDBBackend, name, _serialised(method))
    # moto checks a conditional PutObject (If-None-Match: *) and then writes, unlocked: two
    # writers could both pass. S3 decides it atomically.
    if not getattr(S3Response.put_object, _MARK, False):
        S3Response.put_object = _serialised(S3Response.put_object, _S3_LOCK)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    install()
    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
