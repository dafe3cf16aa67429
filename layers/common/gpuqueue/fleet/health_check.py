"""Probe GPU endpoints' health routes (per protocol) concurrently and record the results.

Probes carry the endpoint's credentials like any call: a 401/403 (a wrong or missing key)
or a credential that cannot be read makes the endpoint unhealthy, with the reason in
`last_error`, so no work is sent where it would be refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from gpuqueue.errors import GpuError
from gpuqueue.fleet.endpoint_declarations import Declaration
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.gpu import cog_client
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.models import Endpoint, EndpointProtocol, EndpointState, HealthResult, TaskKind

MAX_PROBE_THREADS = 16


@dataclass(frozen=True)
class HealthProbe:
    """How one protocol's server says it can take work: the route to GET, and what its
    answer means (`judge`: None when healthy, else why not)."""

    path: str
    judge: Callable[[requests.Response], str | None]


def status_200(response: requests.Response) -> str | None:
    if response.status_code == 200:
        return None
    return f"health check answered HTTP {response.status_code}"


# Per protocol; a protocol not listed is probed at /health, healthy on HTTP 200.
HEALTH_PROBES: dict[EndpointProtocol, HealthProbe] = {
    EndpointProtocol.COG: HealthProbe("/health-check", cog_client.health_problem),
}
DEFAULT_PROBE = HealthProbe("/health", status_200)


@dataclass(frozen=True)
class FleetHealth:
    """A kind's endpoints as the healthy-endpoints alarm compares them."""

    active: int  # state ACTIVE: should be serving, healthy or not
    healthy: int  # may receive work now (active, healthy, circuit not open)


def fleet_health(endpoints: Sequence[Endpoint], now: float) -> FleetHealth:
    """Counted right after a check, so every row is fresh: age is not held against it."""
    return FleetHealth(
        active=sum(1 for e in endpoints if e.state is EndpointState.ACTIVE),
        healthy=sum(1 for e in endpoints if e.is_routable(now, float("inf"))),
    )


def probe(
    session: requests.Session,
    endpoint: Endpoint,
    *,
    timeout_seconds: float,
    credentials: GpuCredentials | None = None,
) -> HealthResult:
    started = time.monotonic()
    error: str | None = None
    check = HEALTH_PROBES.get(endpoint.protocol, DEFAULT_PROBE)
    url = f"{endpoint.url.rstrip('/')}{check.path}"
    timeout = (min(1.0, timeout_seconds), timeout_seconds)
    try:
        response = (credentials or GpuCredentials()).send(
            endpoint, lambda headers: session.get(url, headers=dict(headers), timeout=timeout)
        )
        error = check.judge(response)
        healthy = error is None
    except GpuError as exc:  # refused (401/403), or its credential could not be read
        healthy = False
        error = f"health check failed: {exc}"
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


@dataclass(frozen=True)
class CheckReport:
    results: list[HealthResult]  # the last round's probes
    fleets: dict[TaskKind, FleetHealth]  # every kind's, counted after the last round


class HealthChecker:
    def __init__(
        self,
        registry: EndpointRegistry,
        session: requests.Session | None = None,
        *,
        timeout_seconds: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        credentials: GpuCredentials | None = None,
    ) -> None:
        self._registry = registry
        self._session = session or requests.Session()
        self._timeout = timeout_seconds
        self._sleep = sleep
        self._credentials = credentials or GpuCredentials()

    def run(
        self,
        declared: dict[TaskKind, Declaration],
        *,
        rounds: int = 1,
        period_seconds: float = 30.0,
        remaining_seconds: Callable[[], float] = lambda: float("inf"),
    ) -> list[HealthResult]:
        """Sync the declared endpoints, then probe every endpoint `rounds` times, a period apart.

        Returns the last round's results. Stops early rather than run past the invocation.
        """
        for kind, declaration in declared.items():
            # A refused entry removes nothing: its row (if any) stays as it was.
            self._registry.sync_declared(
                kind, declaration.endpoints, remove_undeclared=not declaration.errors
            )
        results: list[HealthResult] = []
        for round_number in range(rounds):
            if round_number:
                if remaining_seconds() < period_seconds + 2 * self._timeout + 1:
                    break
                self._sleep(period_seconds)
            results = self.check_once(list(declared))
        return results

    def check(
        self,
        declared: dict[TaskKind, Declaration],
        *,
        rounds: int = 1,
        period_seconds: float = 30.0,
        remaining_seconds: Callable[[], float] = lambda: float("inf"),
        clock: Callable[[], float] = time.time,
    ) -> CheckReport:
        """A scheduled check: `run`, then every kind's fleet as the healthy-endpoints alarm
        counts it (admin-added endpoints and kinds declared nowhere included)."""
        results = self.run(
            declared,
            rounds=rounds,
            period_seconds=period_seconds,
            remaining_seconds=remaining_seconds,
        )
        fleets = {kind: fleet_health(self._registry.endpoints(kind), clock()) for kind in TaskKind}
        return CheckReport(results, fleets)

    def check_once(self, kinds: Sequence[TaskKind]) -> list[HealthResult]:
        """Probe every non-disabled endpoint of these kinds (declared or admin-added)."""
        endpoints = [
            e
            for kind in kinds
            for e in self._registry.endpoints(kind)
            if e.state is not EndpointState.DISABLED
        ]
        results = self.probe_all(endpoints)
        for endpoint, result in zip(endpoints, results, strict=True):
            self._registry.record_health(result, endpoint)
        return results

    def probe_all(self, endpoints: Sequence[Endpoint]) -> list[HealthResult]:
        if not endpoints:
            return []
        workers = min(MAX_PROBE_THREADS, len(endpoints))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(
                pool.map(
                    lambda e: probe(
                        self._session,
                        e,
                        timeout_seconds=self._timeout,
                        credentials=self._credentials,
                    ),
                    endpoints,
                )
            )
