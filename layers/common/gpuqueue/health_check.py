"""Probe GPU endpoints' `/health` concurrently and record the results."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

from gpuqueue.endpoint_registry import EndpointRegistry
from gpuqueue.models import Endpoint, HealthResult, TaskKind

MAX_PROBE_THREADS = 16


def probe(session: requests.Session, endpoint: Endpoint, *, timeout_seconds: float) -> HealthResult:
    started = time.monotonic()
    error: str | None = None
    try:
        response = session.get(
            f"{endpoint.url.rstrip('/')}/health",
            timeout=(min(1.0, timeout_seconds), timeout_seconds),
        )
        healthy = response.status_code == 200
        if not healthy:
            error = f"health check answered HTTP {response.status_code}"
    except requests.RequestException as exc:
        healthy = False
        error = f"health check failed: {type(exc).__name__}"
    return HealthResult(
        endpoint_id=endpoint.endpoint_id,
        healthy=healthy,
        latency_ms=(time.monotonic() - started) * 1000,
        checked_at=time.time(),
        error=error,
    )


class HealthChecker:
    def __init__(
        self,
        registry: EndpointRegistry,
        session: requests.Session | None = None,
        *,
        timeout_seconds: float = 2.0,
    ) -> None:
        self._registry = registry
        self._session = session or requests.Session()
        self._timeout = timeout_seconds

    def run(self, declared: dict[TaskKind, list[str]]) -> list[HealthResult]:
        """Sync the declared endpoints, probe every endpoint of those kinds, record results."""
        endpoints: list[Endpoint] = []
        for kind, urls in declared.items():
            endpoints.extend(self._registry.sync_declared(kind, urls))
        results = self.probe_all(endpoints)
        for result in results:
            self._registry.record_health(result)
        return results

    def probe_all(self, endpoints: Sequence[Endpoint]) -> list[HealthResult]:
        if not endpoints:
            return []
        workers = min(MAX_PROBE_THREADS, len(endpoints))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(
                pool.map(
                    lambda e: probe(self._session, e, timeout_seconds=self._timeout), endpoints
                )
            )
