"""One handler module's resolver serving requests on many threads at once: each request is
answered as its own caller (Lambda runs one at a time per container; the integration tests
run many in one process)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpuqueue.api.resolver import build_resolver, current_caller
from gpuqueue_testing import FakeLambdaContext, load_event

THREADS = 8


def _request(sub: str, path: str) -> dict[str, Any]:
    event = load_event("submit_image")
    event["routeKey"] = event["requestContext"]["routeKey"] = f"GET {path}"
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["requestContext"]["http"]["method"] = "GET"
    event.pop("body", None)
    event["isBase64Encoded"] = False
    event["requestContext"]["authorizer"]["jwt"]["claims"].update({"sub": sub, "username": sub})
    return event


def test_requests_on_many_threads_each_see_their_own_caller_and_route() -> None:
    app = build_resolver()
    # Every request is inside its route before any reads its caller: a resolver that keeps
    # one request for all threads answers them all as the last one to arrive.
    inside = threading.Barrier(THREADS)

    @app.get("/whoami/<tag>")
    def whoami(tag: str) -> dict[str, str]:
        inside.wait(timeout=10)
        return {"sub": current_caller(app).sub, "tag": tag, "path": app.current_event.path}

    def call(i: int) -> tuple[int, dict[str, str]]:
        answer = app.resolve(_request(f"user-{i}", f"/whoami/t{i}"), FakeLambdaContext())
        return answer["statusCode"], json.loads(answer["body"])

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        answers = list(pool.map(call, range(THREADS)))

    assert answers == [
        (200, {"sub": f"user-{i}", "tag": f"t{i}", "path": f"/whoami/t{i}"}) for i in range(THREADS)
    ]


def test_a_request_ending_on_one_thread_leaves_anothers_route_in_place() -> None:
    app = build_resolver()
    first_inside, first_done = threading.Event(), threading.Event()

    @app.get("/slow")
    def slow() -> dict[str, str]:
        first_inside.set()
        first_done.wait(timeout=10)  # another request starts and ends meanwhile
        return {"sub": current_caller(app).sub}

    @app.get("/fast")
    def fast() -> dict[str, str]:
        return {"sub": current_caller(app).sub}

    with ThreadPoolExecutor(max_workers=1) as pool:
        slow_answer = pool.submit(app.resolve, _request("slow-user", "/slow"), FakeLambdaContext())
        assert first_inside.wait(timeout=10)
        fast_answer = app.resolve(_request("fast-user", "/fast"), FakeLambdaContext())
        first_done.set()
        answer = slow_answer.result(timeout=10)

    assert json.loads(fast_answer["body"]) == {"sub": "fast-user"}
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"]) == {"sub": "slow-user"}
    assert answer["headers"]["X-Content-Type-Options"] == "nosniff"
