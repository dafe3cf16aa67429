"""The checker's rounds within one scheduled run: a period apart, and never one that could
outlast the invocation (Lambda would kill it mid-probe, its results unwritten)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import requests

from gpuqueue.fleet.endpoint_declarations import Declaration, DeclaredEndpoint
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.health_check import HealthChecker
from gpuqueue.models import TaskKind

DECLARED = {
    TaskKind.IMAGE: Declaration(
        endpoints=[DeclaredEndpoint(endpoint_id="gpu-a", url="http://gpu-a:8000")]
    )
}


class CountingSession:
    """Answers every health probe 200 and counts them."""

    def __init__(self) -> None:
        self.probes: list[str] = []

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        self.probes.append(url)
        answer = requests.Response()
        answer.status_code = 200
        answer._content = b"{}"
        return answer


def checker(
    template_table: Callable[[str], Any], session: CountingSession, slept: list[float]
) -> HealthChecker:
    return HealthChecker(
        EndpointRegistry(template_table("EndpointsTable")),
        cast(requests.Session, session),
        timeout_seconds=2.0,
        sleep=slept.append,
    )


def test_each_round_probes_every_endpoint_a_period_after_the_last(
    template_table: Callable[[str], Any],
) -> None:
    session, slept = CountingSession(), []
    check = checker(template_table, session, slept)

    results = check.run(DECLARED, rounds=3, period_seconds=20.0, remaining_seconds=lambda: 300.0)

    assert session.probes == ["http://gpu-a:8000/health"] * 3
    assert slept == [20.0, 20.0]
    assert [(r.endpoint_id, r.healthy) for r in results] == [("gpu-a", True)]


def test_a_round_that_could_outlast_the_invocation_is_not_started(
    template_table: Callable[[str], Any],
) -> None:
    # 30 s left: a 20 s wait and a round of probes (up to 2 x 2 s, plus a second) would fit
    # once, not twice.
    left = iter([30.0, 5.0])
    session, slept = CountingSession(), []
    check = checker(template_table, session, slept)

    check.run(DECLARED, rounds=3, period_seconds=20.0, remaining_seconds=lambda: next(left))

    assert session.probes == ["http://gpu-a:8000/health"] * 2
    assert slept == [20.0]
