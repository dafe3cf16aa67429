"""Handlers called in this process sign with the keys of the function they stand for.

The integration harness runs every handler in the test process, where boto3 reads one set of
keys from the environment. Here each thread says which function it is running
(`acting_as`), and every boto3 client built from the default session signs each request with
that function's keys — its execution role, enforced by moto (`gpuqueue_local.moto_iam`) —
or, outside a function, with the operator's (`testing`, which may do anything). Threads a
handler starts inherit its identity, as code in one Lambda invocation would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import botocore.session
from botocore.credentials import Credentials, ReadOnlyCredentials

from gpuqueue_local.moto_iam import ADMIN_ACCESS_KEY_ID, ADMIN_SECRET_ACCESS_KEY

_OPERATOR = ReadOnlyCredentials(ADMIN_ACCESS_KEY_ID, ADMIN_SECRET_ACCESS_KEY, None)
_current = threading.local()


def current() -> ReadOnlyCredentials:
    keys: ReadOnlyCredentials | None = getattr(_current, "keys", None)
    return keys or _OPERATOR


def act_as_operator() -> None:
    """This thread signs as the operator again, whatever it was left acting as."""
    _current.keys = None


@contextlib.contextmanager
def acting_as(access_key_id: str, secret_access_key: str) -> Iterator[None]:
    """This thread's AWS calls sign with these keys until the block ends."""
    previous = getattr(_current, "keys", None)
    _current.keys = ReadOnlyCredentials(access_key_id, secret_access_key, None)
    try:
        yield
    finally:
        _current.keys = previous


class ThreadCredentials(Credentials):
    """botocore credentials resolved at each signature from the calling thread."""

    def __init__(self) -> None:
        super().__init__(ADMIN_ACCESS_KEY_ID, ADMIN_SECRET_ACCESS_KEY, method="env")

    def get_frozen_credentials(self) -> ReadOnlyCredentials:
        return current()

    @property  # type: ignore[override]
    def access_key(self) -> str:
        return current().access_key

    @access_key.setter
    def access_key(self, value: str) -> None:
        pass  # botocore's constructor sets it; the thread decides

    @property  # type: ignore[override]
    def secret_key(self) -> str:
        return current().secret_key

    @secret_key.setter
    def secret_key(self, value: str) -> None:
        pass

    @property  # type: ignore[override]
    def token(self) -> None:
        return None

    @token.setter
    def token(self, value: Any) -> None:
        pass


_installed = False
_original_start = threading.Thread.start


def install() -> None:
    """Route the default sessions' credentials through the calling thread (idempotent)."""
    global _installed  # noqa: PLW0603 - one patch per process
    if _installed:
        return
    credentials = ThreadCredentials()
    original = botocore.session.Session.get_credentials

    def get_credentials(self: botocore.session.Session) -> Any:
        # Keys a session was given explicitly stay its own; the environment's (the operator's
        # `testing`) give way to the thread's.
        explicit = original(self)
        if explicit is None or explicit.access_key == ADMIN_ACCESS_KEY_ID:
            return credentials
        return explicit

    botocore.session.Session.get_credentials = get_credentials  # type: ignore[method-assign]

    def start(self: threading.Thread) -> None:
        inherited = getattr(_current, "keys", None)
        run = self.run

        def run_as_parent() -> None:
            _current.keys = inherited
            run()

        self.run = run_as_parent  # type: ignore[method-assign]
        _original_start(self)

    threading.Thread.start = start  # type: ignore[method-assign]
    _installed = True
