"""Per-user submit rate: a token bucket per user; past it 429 + Retry-After + X-RateLimit-*."""

from __future__ import annotations

import json

import boto3
import pytest

from fakes import FakeClock, stop_rate_limiter_clocks


@pytest.fixture(autouse=True)
def stopped_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The handlers' rate limiters read a clock that stands still."""
    return stop_rate_limiter_clocks(monkeypatch)


def _tasks_of(h) -> int:
    table = boto3.resource("dynamodb").Table(h.stack.ref("TasksTable"))
    return int(table.scan(Select="COUNT")["Count"])


def test_a_burst_over_the_rate_gets_429_with_a_correct_retry_after(make_stack, alice, bob):
    h = make_stack(parameters={"SubmitBurst": "3", "SubmitRatePerSecond": "0.5"})

    answers = [h.submit(alice, {"prompt": f"p{i}"}) for i in range(4)]

    assert [a.status for a in answers] == [202, 202, 202, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert {a.headers["x-ratelimit-limit"] for a in answers} == {"3"}
    refused = answers[-1]
    # One token at 0.5 a second: 2 s away.
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["code"] == "RATE_LIMITED"
    assert int(refused.headers["x-ratelimit-reset"]) >= 2
    # The refused submit created nothing.
    assert _tasks_of(h) == 3
    assert len(h.receive(max_messages=10)) == 3
    # Buckets are per user.
    assert h.submit(bob, {"prompt": "bob's"}).status == 202


def test_async_speech_submits_share_the_users_bucket(make_stack, alice):
    h = make_stack(parameters={"SubmitBurst": "1", "SubmitRatePerSecond": "0.1"})
    assert h.submit(alice).status == 202

    response = h.call(
        "speech_handler",
        "POST",
        "/api/v1/speech/async",
        body={"filename": "talk.wav", "size_bytes": 100},
        user=alice,
    )

    assert response.status == 429
    assert response.headers["retry-after"] == "10"


def test_a_refused_submit_emits_a_rate_limit_hit_metric(make_stack, alice, capsys):
    h = make_stack(parameters={"SubmitBurst": "1", "SubmitRatePerSecond": "0.1"})
    h.submit(alice)
    capsys.readouterr()

    assert h.submit(alice).status == 429

    emitted = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line
    ]
    assert any(blob.get("RateLimitHits") == [1.0] for blob in emitted), emitted
