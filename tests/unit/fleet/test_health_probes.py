"""What each protocol's health answer means: ComfyUI's /system_stats is healthy only as
ComfyUI writes it (some other server answering 200 on that port is not a ComfyUI)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import requests

from gpuqueue.fleet.health_check import HEALTH_PROBES, comfyui_system_stats, probe
from gpuqueue.models import Endpoint, EndpointProtocol, TaskKind


def answer(status: int, body: bytes) -> requests.Response:
    result = requests.Response()
    result.status_code = status
    result._content = body
    return result


def test_comfyuis_system_stats_with_its_system_object_is_healthy() -> None:
    body = b'{"system": {"comfyui_version": "0.8.1"}, "devices": []}'

    assert HEALTH_PROBES[EndpointProtocol.COMFYUI].path == "/system_stats"
    assert comfyui_system_stats(answer(200, body)) is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>It works!</html>", "/system_stats answered no JSON: not a ComfyUI server"),
        (b'{"status": "ok"}', "/system_stats answered without 'system': not a ComfyUI server"),
        (b'["system"]', "/system_stats answered without 'system': not a ComfyUI server"),
        (b'{"system": "up"}', "/system_stats answered without 'system': not a ComfyUI server"),
    ],
    ids=["html", "other-json", "a-list", "system-not-an-object"],
)
def test_a_200_that_is_not_comfyuis_system_stats_is_unhealthy(body: bytes, problem: str) -> None:
    assert comfyui_system_stats(answer(200, body)) == problem


class Unreachable:
    def get(self, url: str, **kwargs: Any) -> requests.Response:
        raise requests.ConnectTimeout(url)


def test_an_endpoint_that_cannot_be_reached_is_unhealthy_saying_how() -> None:
    endpoint = Endpoint(
        endpoint_id="comfy-1",
        url="http://comfy-1:8188",
        kind=TaskKind.IMAGE,
        protocol=EndpointProtocol.COMFYUI,
    )

    result = probe(cast(requests.Session, Unreachable()), endpoint, timeout_seconds=1.0)

    assert (result.endpoint_id, result.healthy) == ("comfy-1", False)
    assert result.error == "health check failed: ConnectTimeout"
