"""Endpoint choice: pure logic over a list of routable endpoints."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

from gpuqueue.models import Endpoint


class RoundRobinBalancer:
    """Round-robin over the routable endpoints, skipping ones that just failed this task.

    The cursor lives in the balancer object (one per container): each dispatcher container
    rotates independently, which spreads load without a shared counter write per task.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick_endpoint(
        self, endpoints: Sequence[Endpoint], *, avoid: Collection[str] = ()
    ) -> Endpoint | None:
        if not endpoints:
            return None
        preferred = [e for e in endpoints if e.endpoint_id not in avoid] or list(endpoints)
        return preferred[next(self._counter) % len(preferred)]
