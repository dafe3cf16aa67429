"""Tests for the stand-in GPU image server (real HTTP on a free localhost port)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from gpuqueue_local.standins.image_server import (
    ImageServer,
    ImageServerKnobs,
    render_png,
)

OPENAI = "/v1/images/generations"
A1111 = "/sdapi/v1/txt2img"
TIMEOUT = 10.0
# The A1111 half's server-wide job state, idle and never interrupted.
NO_A1111_JOBS = {"interrupts": 0, "interrupted": 0, "current_task": None, "queued_tasks": 0}
LOCAL_DIR = Path(__file__).resolve().parents[2] / "local"


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll a condition with a deadline instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    srv = ImageServer(port=0)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def openai(srv: ImageServer, **body: Any) -> requests.Response:
    return requests.post(srv.url + OPENAI, json=body, timeout=TIMEOUT)


def a1111(srv: ImageServer, **body: Any) -> requests.Response:
    return requests.post(srv.url + A1111, json=body, timeout=TIMEOUT)


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


class InThread:
    """Run a request in a thread and keep its result or exception."""

    def __init__(self, fn: Callable[[], requests.Response]) -> None:
        self.result: requests.Response | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], requests.Response]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = TIMEOUT) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "request thread did not finish"


# --------------------------------------------------------------------------- protocols


def test_openai_returns_png_of_requested_size(server: ImageServer) -> None:
    resp = openai(server, prompt="a red fox", n=1, size="320x200", response_format="b64_json")
    assert resp.status_code == 200
    body = resp.json()
    assert isinstance(body["created"], int)
    assert abs(body["created"] - time.time()) < 60
    assert len(body["data"]) == 1
    assert body["data"][0]["revised_prompt"] == "a red fox"
    img = decode(body["data"][0]["b64_json"])
    assert img.format == "PNG"
    assert img.size == (320, 200)


def test_openai_optional_fields_and_n(server: ImageServer) -> None:
    resp = openai(server, prompt="p", n=2, size="64x64", negative_prompt="blur", seed=5, steps=4)
    assert resp.status_code == 200
    data = resp.json()["data"]
    assert len(data) == 2
    assert data[0]["b64_json"] != data[1]["b64_json"]
    assert all(decode(d["b64_json"]).size == (64, 64) for d in data)


def test_a1111_returns_png_of_requested_size(server: ImageServer) -> None:
    resp = a1111(server, prompt="a castle", negative_prompt="fog", width=256, height=128, seed=7)
    assert resp.status_code == 200
    body = resp.json()
    assert len(body["images"]) == 1
    img = decode(body["images"][0])
    assert img.format == "PNG"
    assert img.size == (256, 128)
    assert body["parameters"]["prompt"] == "a castle"
    assert body["parameters"]["width"] == 256
    info = json.loads(body["info"])
    assert info["seed"] == 7
    assert info["negative_prompt"] == "fog"


def test_a1111_defaults_to_512(server: ImageServer) -> None:
    resp = a1111(server, prompt="defaults")
    assert resp.status_code == 200
    assert decode(resp.json()["images"][0]).size == (512, 512)


def test_images_are_deterministic(server: ImageServer) -> None:
    def png(prompt: str, seed: int) -> str:
        resp = openai(server, prompt=prompt, size="128x128", seed=seed)
        assert resp.status_code == 200
        return str(resp.json()["data"][0]["b64_json"])

    first = png("same prompt", 42)
    assert png("same prompt", 42) == first
    assert png("other prompt", 42) != first
    assert png("same prompt", 43) != first

    # Both protocols render the same picture for the same (prompt, seed, size).
    resp = a1111(server, prompt="same prompt", seed=42, width=128, height=128)
    assert resp.json()["images"][0] == first


def test_missing_seed_is_still_deterministic(server: ImageServer) -> None:
    a = openai(server, prompt="no seed", size="64x64").json()["data"][0]["b64_json"]
    b = openai(server, prompt="no seed", size="64x64").json()["data"][0]["b64_json"]
    assert a == b


def test_render_png_is_fast() -> None:
    render_png("warm-up", 0, 512, 512)  # font loading is cached after the first call
    best = min(_timed(render_png, f"prompt {i}", i) for i in range(5))
    # Target is < 50 ms; the bound is generous so a loaded CI box does not flake.
    assert best < 0.2


def _timed(fn: Callable[[str, int, int, int], bytes], prompt: str, seed: int) -> float:
    start = time.perf_counter()
    fn(prompt, seed, 512, 512)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (OPENAI, b"{not json"),
        (OPENAI, b"[1, 2]"),
        (OPENAI, b""),
        (OPENAI, json.dumps({"size": "64x64"}).encode()),
        (OPENAI, json.dumps({"prompt": "", "size": "64x64"}).encode()),
        (OPENAI, json.dumps({"prompt": "   "}).encode()),
        (OPENAI, json.dumps({"prompt": 3}).encode()),
        (OPENAI, json.dumps({"prompt": "x", "size": "big"}).encode()),
        (OPENAI, json.dumps({"prompt": "x", "size": "32x32"}).encode()),
        (OPENAI, json.dumps({"prompt": "x", "size": "4096x512"}).encode()),
        (OPENAI, json.dumps({"prompt": "x", "size": 512}).encode()),
        (OPENAI, json.dumps({"prompt": "x", "seed": "1"}).encode()),
        (OPENAI, json.dumps({"prompt": "x", "response_format": "url"}).encode()),
        (A1111, b"nope"),
        (A1111, json.dumps({"width": 512}).encode()),
        (A1111, json.dumps({"prompt": "x", "width": 10}).encode()),
        (A1111, json.dumps({"prompt": "x", "height": 4096}).encode()),
        (A1111, json.dumps({"prompt": "x", "steps": 0}).encode()),
    ],
)
def test_bad_requests_answer_400(server: ImageServer, path: str, body: bytes) -> None:
    resp = requests.post(
        server.url + path,
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert isinstance(err["message"], str)
    assert err["message"]


def test_unknown_route_is_404(server: ImageServer) -> None:
    assert requests.get(server.url + "/nope", timeout=TIMEOUT).status_code == 404
    assert requests.post(server.url + "/nope", timeout=TIMEOUT).status_code == 404


# --------------------------------------------------------------------------- knobs


def test_failure_rate_one_always_fails(server: ImageServer) -> None:
    server.knobs.failure_rate = 1.0
    for _ in range(3):
        resp = openai(server, prompt="x", size="64x64")
        assert resp.status_code == 500
        assert resp.json() == {"error": {"message": "injected failure"}}
    server.knobs.fail_status = 503
    assert a1111(server, prompt="x", width=64, height=64).status_code == 503


def test_failure_sequence_is_deterministic_with_seed() -> None:
    def statuses() -> list[int]:
        knobs = ImageServerKnobs(failure_rate=0.5, failure_seed=1234)
        with ImageServer(knobs=knobs) as srv:
            return [openai(srv, prompt="x", size="64x64").status_code for _ in range(12)]

    first = statuses()
    assert first == statuses()
    assert set(first) == {200, 500}


def test_health_and_healthy_knob(server: ImageServer) -> None:
    resp = requests.get(server.url + "/health", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "in_flight": 0, "max_in_flight": 0, "calls": 0}
    server.knobs.healthy = False
    resp = requests.get(server.url + "/health", timeout=TIMEOUT)
    assert resp.status_code == 503
    assert resp.json() == {"status": "down"}


def test_knobs_endpoint(server: ImageServer) -> None:
    resp = requests.post(
        server.url + "/knobs", json={"healthy": False, "capacity": 3}, timeout=TIMEOUT
    )
    assert resp.status_code == 200
    assert resp.json()["healthy"] is False
    assert resp.json()["capacity"] == 3
    assert server.knobs.capacity == 3
    assert requests.get(server.url + "/health", timeout=TIMEOUT).status_code == 503
    assert requests.get(server.url + "/knobs", timeout=TIMEOUT).json()["capacity"] == 3

    for bad in ({"bogus": 1}, {"failure_rate": 2}, {"hang": "yes"}, {"capacity": -1}):
        resp = requests.post(server.url + "/knobs", json=bad, timeout=TIMEOUT)
        assert resp.status_code == 400, bad
    # A rejected update changes nothing.
    bad_mix = {"capacity": 9, "latency_s": -1}
    assert requests.post(server.url + "/knobs", json=bad_mix, timeout=TIMEOUT).status_code == 400
    assert server.knobs.capacity == 3


def test_latency_knob_is_honoured(server: ImageServer) -> None:
    server.knobs.latency_s = 0.3
    start = time.monotonic()
    resp = openai(server, prompt="slow", size="64x64")
    elapsed = time.monotonic() - start
    assert resp.status_code == 200
    assert elapsed >= 0.3


def test_capacity_rejects_excess_calls(server: ImageServer) -> None:
    server.knobs.capacity = 1
    server.knobs.hang = True  # keeps the first call in flight until we release it
    first = InThread(lambda: openai(server, prompt="first", size="64x64"))
    wait_until(lambda: server.stats()["in_flight"] == 1, what="first call in flight")

    second = openai(server, prompt="second", size="64x64")
    assert second.status_code == 429
    assert second.json() == {"error": {"message": "busy"}}

    server.knobs.hang = False  # release the first call
    first.join()
    assert first.error is None
    assert first.result is not None
    assert first.result.status_code == 200

    stats = server.stats()
    assert stats["max_in_flight"] == 1
    assert stats["in_flight"] == 0
    assert stats["calls"] == 2


def test_concurrent_slow_calls_respect_capacity(server: ImageServer) -> None:
    server.knobs.capacity = 2
    server.knobs.latency_s = 0.2
    calls = [InThread(lambda: openai(server, prompt="c", size="64x64")) for _ in range(6)]
    for call in calls:
        call.join()
    codes = sorted(c.result.status_code for c in calls if c.result is not None)
    assert len(codes) == 6
    assert set(codes) <= {200, 429}
    assert 200 in codes
    assert server.stats()["max_in_flight"] <= 2


def test_hang_then_stop_returns_quickly() -> None:
    srv = ImageServer(knobs=ImageServerKnobs(hang=True))
    srv.start()
    call = InThread(lambda: openai(srv, prompt="hang", size="64x64"))
    try:
        wait_until(lambda: srv.stats()["in_flight"] == 1, what="hanging call in flight")
    finally:
        start = time.monotonic()
        srv.stop()
        elapsed = time.monotonic() - start
    assert elapsed < 2.0
    call.join()
    # The hung call is dropped without an answer, like a dead GPU box.
    assert isinstance(call.error, requests.ConnectionError)
    wait_until(lambda: srv.stats()["in_flight"] == 0, what="hung handler to exit")


def test_hang_ends_when_client_disconnects(server: ImageServer) -> None:
    server.knobs.hang = True
    with pytest.raises(requests.ReadTimeout):
        requests.post(server.url + OPENAI, json={"prompt": "x", "size": "64x64"}, timeout=0.3)
    wait_until(lambda: server.stats()["in_flight"] == 0, what="handler to notice disconnect")


# --------------------------------------------------------------------------- stats


def test_stats_and_reset(server: ImageServer) -> None:
    openai(server, prompt="one", size="64x64")
    a1111(server, prompt="two", width=64, height=64)
    openai(server, prompt="", size="64x64")  # bad request still counts as a call
    stats = requests.get(server.url + "/stats", timeout=TIMEOUT).json()
    busy = stats.pop("busy_slot_seconds")
    changes = stats.pop("in_flight_changes")
    assert stats == {
        "calls": 3,
        "in_flight": 0,
        "max_in_flight": 1,
        "prompts": ["one", "two"],
        "refused": 0,
        "a1111": NO_A1111_JOBS,
    }
    # Each admitted call in, then out (the bad request never held a slot), in time order.
    assert [n for _, n in changes] == [1, 0, 1, 0]
    assert [t for t, _ in changes] == sorted(t for t, _ in changes)
    assert server.stats() == stats | {"busy_slot_seconds": busy, "in_flight_changes": changes}

    health = requests.get(server.url + "/health", timeout=TIMEOUT).json()
    assert health["calls"] == 3

    resp = requests.post(server.url + "/reset-stats", timeout=TIMEOUT)
    assert resp.status_code == 200
    empty = {
        "calls": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "busy_slot_seconds": 0.0,
        "prompts": [],
        "refused": 0,
        "in_flight_changes": [],
        "a1111": NO_A1111_JOBS,
    }
    assert resp.json() == empty
    assert server.stats() == empty


def test_busy_slot_seconds_add_up_the_time_calls_spend_generating(server: ImageServer) -> None:
    server.set_knobs({"latency_s": 0.3})
    seen: list[float] = []

    def call() -> None:
        started = time.monotonic()
        openai(server, prompt="p", size="64x64")
        seen.append(time.monotonic() - started)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    # Two concurrent 0.3 s calls: at least 0.6 slot-seconds, however they overlapped, and no
    # more than the two calls lasted as their clients saw them (however slow the machine).
    assert len(seen) == 2
    assert 0.6 <= server.stats()["busy_slot_seconds"] <= sum(seen)


# --------------------------------------------------------------------------- lifecycle / CLI


def test_context_manager_and_url() -> None:
    with ImageServer() as srv:
        assert srv.port > 0
        assert srv.url == f"http://127.0.0.1:{srv.port}"
        assert requests.get(srv.url + "/health", timeout=TIMEOUT).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "/health", timeout=TIMEOUT)
    srv.stop()  # idempotent


def test_stop_without_start_does_not_block() -> None:
    srv = ImageServer()
    srv.stop()


KEY = "standin-key-4b1d"


def test_the_credential_knob_refuses_calls_and_health_checks_without_the_bearer_key(
    server: ImageServer,
) -> None:
    server.set_knobs({"auth_token": KEY})
    body = {"prompt": "x", "size": "64x64"}
    wrong = {"Authorization": "Bearer not-the-key"}
    right = {"Authorization": f"Bearer {KEY}"}

    for headers in ({}, wrong, {"Authorization": KEY}, {"X-Api-Key": KEY}):
        assert (
            requests.post(
                server.url + OPENAI, json=body, headers=headers, timeout=TIMEOUT
            ).status_code
            == 401
        )
        assert (
            requests.get(server.url + "/health", headers=headers, timeout=TIMEOUT).status_code
            == 401
        )
    refused = requests.post(server.url + A1111, json={"prompt": "x"}, timeout=TIMEOUT)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert (
        requests.post(server.url + OPENAI, json=body, headers=right, timeout=TIMEOUT).status_code
        == 200
    )
    assert requests.get(server.url + "/health", headers=right, timeout=TIMEOUT).status_code == 200
    # Refusals never reach the model: they are counted apart from calls.
    assert (server.stats()["calls"], server.stats()["refused"]) == (1, 9)


def test_the_credential_knob_can_want_an_api_key_header(server: ImageServer) -> None:
    server.set_knobs({"auth_token": KEY, "auth_header": "X-Api-Key"})
    body = {"prompt": "x", "size": "64x64"}

    bearer = {"Authorization": f"Bearer {KEY}"}
    assert (
        requests.post(server.url + OPENAI, json=body, headers=bearer, timeout=TIMEOUT).status_code
        == 401
    )
    key = {"X-Api-Key": KEY}
    assert (
        requests.post(server.url + OPENAI, json=body, headers=key, timeout=TIMEOUT).status_code
        == 200
    )


def test_control_routes_stay_open_and_never_show_the_key(server: ImageServer) -> None:
    resp = requests.post(server.url + "/knobs", json={"auth_token": KEY}, timeout=TIMEOUT)

    assert resp.status_code == 200
    assert resp.json()["auth_token"] == "***"
    assert KEY not in requests.get(server.url + "/knobs", timeout=TIMEOUT).text
    assert requests.get(server.url + "/stats", timeout=TIMEOUT).status_code == 200
    # Clearing the knob opens the server again.
    requests.post(server.url + "/knobs", json={"auth_token": None}, timeout=TIMEOUT)
    assert requests.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    for bad in ({"auth_token": ""}, {"auth_token": "a\r\nb"}, {"auth_header": "X Api"}):
        assert requests.post(server.url + "/knobs", json=bad, timeout=TIMEOUT).status_code == 400


def test_cli_prints_url_and_stops_on_sigterm() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(LOCAL_DIR), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpuqueue_local.standins.image_server",
            "--port",
            "0",
            "--capacity",
            "2",
            "--failure-rate",
            "1.0",
            "--auth-token",
            KEY,
            "--auth-header",
            "X-Api-Key",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        prefix = "image-server listening on http://127.0.0.1:"
        assert line.startswith(prefix), line
        url = line.removeprefix("image-server listening on ")
        assert requests.get(url + "/health", timeout=TIMEOUT).status_code == 401
        key = {"X-Api-Key": KEY}
        assert requests.get(url + "/health", headers=key, timeout=TIMEOUT).status_code == 200
        knobs = requests.get(url + "/knobs", timeout=TIMEOUT).json()
        assert knobs["capacity"] == 2
        assert knobs["failure_rate"] == 1.0
        assert (knobs["auth_token"], knobs["auth_header"]) == ("***", "X-Api-Key")
        body = {"prompt": "x", "size": "64x64"}
        resp = requests.post(url + OPENAI, json=body, headers=key, timeout=TIMEOUT)
        assert resp.status_code == 500
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == ""  # per-request logging is off by default
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
