"""Where the SDK's errors stop: a data-access method marked here raises StoreError (the
SDK's error as its cause) in place of botocore's, so the logic above it never imports
botocore to tell a failed store call from its own errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from gpuqueue.errors import StoreError

P = ParamSpec("P")
R = TypeVar("R")


def raises_store_error(store: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a method whose SDK errors (a refused, throttled or unreachable call to `store`)
    come out as StoreError. Conditions it handles itself never get this far."""

    def mark(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except (ClientError, BotoCoreError) as error:
                raise StoreError(store, error) from error

        return call

    return mark
