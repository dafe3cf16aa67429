"""Webhook signing, the SSRF guard and the retry schedule (no AWS, no network)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random

import pytest
from gpuqueue_client.webhooks import verify

from gpuqueue.errors import InvalidInput
from gpuqueue.models import Task, TaskStatus, TaskView, WebhookAttempt, WebhookEvent
from gpuqueue.notify.webhook_address_guard import embedded_ipv4
from gpuqueue.notify.webhook_delivery import DeliveryOutcome, HttpAnswer, WebhookDeliverer
from gpuqueue.notify.webhook_messages import DeliveryMessage, WebhookNotifier, delivery_id_for
from gpuqueue.notify.webhook_retry_schedule import (
    MAX_ATTEMPTS,
    retry_delay_seconds,
    retry_schedule_floor,
)
from gpuqueue.notify.webhook_signing import sign
from gpuqueue.notify.webhook_target import WebhookTarget, check_webhook_url, checked_webhook_target


def resolver(*addresses: str):
    return lambda host, port: list(addresses)


def test_sign_matches_an_independent_hmac_and_lists_every_secret():
    body = b'{"event":"task.done"}'

    header = sign(["current", "previous"], body, timestamp=1_800_000_000)

    expected = [
        hmac.new(key, b"1800000000." + body, hashlib.sha256).hexdigest()
        for key in (b"current", b"previous")
    ]
    assert header == f"t=1800000000,v1={expected[0]},v1={expected[1]}"


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_a_public_https_url_is_accepted(address):
    url = "https://hooks.example.com/x"

    assert check_webhook_url(url, allow_loopback=False, resolve=resolver(address)) == url


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.7",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",  # noqa: S104 - the address under test
        "224.0.0.1",
        "::1",
        "fe80::1%eth0",
        "fc00::1",
        "::ffff:127.0.0.1",
    ],
)
def test_a_host_resolving_to_a_non_public_address_is_refused(address):
    with pytest.raises(InvalidInput) as refused:
        check_webhook_url(
            "https://hooks.example.com/x", allow_loopback=False, resolve=resolver(address)
        )

    assert refused.value.field == "webhook_url"


# Each IPv6 form that carries an IPv4 address, for the IPv4 addresses an attacker wants.
EMBEDDED_FORMS = {
    "127.0.0.1": [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:127.0.0.1",  # IPv4-mapped
        "64:ff9b::127.0.0.1",  # NAT64, well-known prefix
        "64:ff9b:1::7f00:1",  # NAT64, local-use prefix
        "2002:7f00:1::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    ],
    "10.0.0.1": [
        "::10.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::10.0.0.1",
        "64:ff9b:1::a00:1",
        "2002:a00:1::1",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ],
    "169.254.169.254": [
        "::169.254.169.254",
        "::ffff:169.254.169.254",
        "64:ff9b::169.254.169.254",
        "64:ff9b:1::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "2001:0:4136:e378:8000:63bf:5601:5601",
    ],
}


@pytest.mark.parametrize(
    ("inner", "address"),
    [(inner, form) for inner, forms in EMBEDDED_FORMS.items() for form in forms],
)
def test_an_ipv6_form_embedding_a_private_ipv4_address_is_refused(inner, address):
    assert inner in {str(a) for a in embedded_ipv4(ipaddress.IPv6Address(address))}

    with pytest.raises(InvalidInput) as refused:
        check_webhook_url(
            "https://hooks.example.com/x", allow_loopback=False, resolve=resolver(address)
        )

    assert refused.value.field == "webhook_url"


def test_the_checked_target_keeps_every_address_the_host_resolved_to():
    target = checked_webhook_target(
        "https://hooks.example.com:8443/x?y=1",
        allow_loopback=False,
        resolve=resolver("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"),
    )

    assert target.addresses == ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert (target.host, target.port, target.request_target) == (
        "hooks.example.com",
        8443,
        "/x?y=1",
    )
    assert target.host_header == "hooks.example.com:8443"


def test_one_private_address_among_public_ones_is_enough_to_refuse():
    with pytest.raises(InvalidInput):
        check_webhook_url(
            "https://h.example.com/", allow_loopback=False, resolve=resolver("1.1.1.1", "10.0.0.1")
        )


def test_the_local_flag_allows_http_and_loopback_but_still_not_private_addresses():
    assert check_webhook_url(
        "http://127.0.0.1:9000/h", allow_loopback=True, resolve=resolver("127.0.0.1")
    )
    with pytest.raises(InvalidInput):
        check_webhook_url("http://10.0.0.1/h", allow_loopback=True, resolve=resolver("10.0.0.1"))


@pytest.mark.parametrize("url", ["ftp://example.com/x", "https://", "not a url", "https://[::1"])
def test_malformed_urls_and_other_schemes_are_refused(url):
    with pytest.raises(InvalidInput):
        check_webhook_url(url, allow_loopback=False, resolve=resolver("1.1.1.1"))


def test_the_retry_schedule_spans_more_than_an_hour_at_its_shortest():
    assert retry_schedule_floor() >= 3600
    rng = random.Random(7)
    waits = [retry_delay_seconds(n, rng=rng) for n in range(1, MAX_ATTEMPTS)]
    assert sum(waits) >= 3600
    assert all(15 <= w <= 900 for w in waits)
    assert waits[0] <= 30 < waits[-1]


def _task(**fields) -> Task:
    return Task(
        task_id="t-1",
        user_id="u-1",
        status=TaskStatus.DONE,
        created_at="2026-11-23T10:00:00Z",
        updated_at="2026-11-23T10:00:05Z",
        **fields,
    )


class Sent:
    def __init__(self) -> None:
        self.messages: list[DeliveryMessage] = []

    def send(self, message: DeliveryMessage) -> None:
        self.messages.append(message)


def test_the_notifier_sends_one_message_per_wanted_event_with_a_stable_id():
    sent = Sent()
    notifier = WebhookNotifier(sent)

    notifier.task_ended(_task(webhook_url="https://h.example.com/"))
    notifier.task_ended(_task(webhook_url="https://h.example.com/"))  # a repeated record
    notifier.task_ended(_task())  # no webhook
    notifier.task_ended(
        _task(webhook_url="https://h.example.com/", webhook_events=[WebhookEvent.FAILED])
    )

    assert [m.delivery_id for m in sent.messages] == [delivery_id_for("t-1", WebhookEvent.DONE)] * 2


class FakeLog:
    def __init__(self, task: Task) -> None:
        self.task = task

    def get(self, task_id: str) -> Task | None:
        return self.task

    def record_delivery(self, task_id: str, attempt: WebhookAttempt, *, max_entries: int) -> bool:
        self.task = self.task.model_copy(update={"deliveries": [*self.task.deliveries, attempt]})
        return True


class ScriptedPoster:
    def __init__(self, *statuses: int | None) -> None:
        self.statuses = list(statuses)
        self.calls: list[dict[str, str]] = []

    def post(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        self.calls.append(headers)
        status = self.statuses.pop(0)
        return HttpAnswer(status_code=status, error=None if status else "ConnectTimeout")


def _deliverer(log: FakeLog, poster: ScriptedPoster, **kwargs) -> WebhookDeliverer:
    return WebhookDeliverer(
        tasks=log,
        poster=poster,
        secrets=lambda: ["s3cret"],
        resolve=resolver("93.184.215.14"),
        rng=random.Random(1),
        clock=lambda: 1_800_000_000.0,
        **kwargs,
    )


def test_a_failed_attempt_is_logged_and_retried_then_the_last_gives_up():
    log = FakeLog(_task(webhook_url="https://h.example.com/"))
    poster = ScriptedPoster(None, 502)
    deliverer = _deliverer(log, poster, max_attempts=2)
    message = DeliveryMessage(task_id="t-1", event=WebhookEvent.DONE, delivery_id="d-1")

    first = deliverer.deliver(message, attempt=1)
    second = deliverer.deliver(message, attempt=2)

    assert first.outcome is DeliveryOutcome.RETRY
    assert first.delay_seconds > 0
    assert second.outcome is DeliveryOutcome.GAVE_UP
    logged = [(a.attempt, a.ok, a.status_code, a.gave_up) for a in log.task.deliveries]
    assert logged == [(1, False, None, False), (2, False, 502, True)]
    assert log.task.deliveries[0].error == "ConnectTimeout"
    assert poster.calls[0]["X-Gpuqueue-Signature"].startswith("t=1800000000,v1=")


def test_a_delivery_that_already_landed_is_not_sent_again():
    log = FakeLog(_task(webhook_url="https://h.example.com/"))
    poster = ScriptedPoster(204)
    deliverer = _deliverer(log, poster)
    message = DeliveryMessage(task_id="t-1", event=WebhookEvent.DONE, delivery_id="d-1")

    assert deliverer.deliver(message, attempt=1).outcome is DeliveryOutcome.DELIVERED
    assert deliverer.deliver(message, attempt=1).outcome is DeliveryOutcome.SKIPPED
    assert len(poster.calls) == 1


def test_a_url_that_now_resolves_privately_is_not_called():
    log = FakeLog(_task(webhook_url="https://h.example.com/"))
    poster = ScriptedPoster()
    deliverer = WebhookDeliverer(
        tasks=log, poster=poster, secrets=lambda: ["s"], resolve=resolver("10.0.0.5")
    )
    message = DeliveryMessage(task_id="t-1", event=WebhookEvent.DONE, delivery_id="d-1")

    result = deliverer.deliver(message, attempt=1)

    assert result.outcome is DeliveryOutcome.RETRY
    assert poster.calls == []
    assert "private" in (log.task.deliveries[0].error or "")


class RecordingPoster:
    """Answers 204 and keeps every request as the receiver gets it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, dict[str, str]]] = []

    def post(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        self.requests.append((target.url, body, headers))
        return HttpAnswer(status_code=204)


def test_a_delivery_is_the_documented_body_signed_so_the_receivers_verify_accepts_it():
    task = _task(webhook_url="https://h.example.com/hook", result_key="results/t-1.png")
    poster = RecordingPoster()
    deliverer = WebhookDeliverer(
        tasks=FakeLog(task),
        poster=poster,
        secrets=lambda: ["current", "previous"],
        resolve=resolver("93.184.215.14"),
        clock=lambda: 1_800_000_000.0,
    )
    message = DeliveryMessage(task_id="t-1", event=WebhookEvent.DONE, delivery_id="d-7")

    assert deliverer.deliver(message, attempt=1).outcome is DeliveryOutcome.DELIVERED

    [(url, body, headers)] = poster.requests
    assert url == "https://h.example.com/hook"
    # Compact JSON with sorted keys: the bytes a receiver verifies are stable.
    assert body == json.dumps(json.loads(body), separators=(",", ":"), sort_keys=True).encode()
    sent = json.loads(body)
    assert set(sent) == {"event", "delivery_id", "task"}
    assert sent["event"] == "task.done"
    assert sent["delivery_id"] == "d-7"
    assert sent["task"] == TaskView.of(task).model_dump(mode="json")
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "gpuqueue-webhooks/1"
    assert headers["X-Gpuqueue-Event"] == "task.done"
    assert headers["X-Gpuqueue-Delivery"] == "d-7"
    signature = headers["X-Gpuqueue-Signature"]
    for secret in ("current", "previous"):  # either side of a rotation verifies
        assert verify(secret, signature, body, now=1_800_000_000)
    assert not verify("other", signature, body, now=1_800_000_000)


def test_a_deliverer_refuses_loopback_unless_told_otherwise():
    task = _task(webhook_url="http://127.0.0.1:8080/hook")
    poster = RecordingPoster()
    message = DeliveryMessage(task_id="t-1", event=WebhookEvent.DONE, delivery_id="d-1")
    refusing = WebhookDeliverer(
        tasks=FakeLog(task), poster=poster, secrets=lambda: ["s"], resolve=resolver("127.0.0.1")
    )
    assert refusing.deliver(message, attempt=1).outcome is DeliveryOutcome.RETRY
    assert poster.requests == []

    allowing = WebhookDeliverer(
        tasks=FakeLog(task),
        poster=poster,
        secrets=lambda: ["s"],
        resolve=resolver("127.0.0.1"),
        allow_loopback=True,
    )
    assert allowing.deliver(message, attempt=1).outcome is DeliveryOutcome.DELIVERED
    assert [r[0] for r in poster.requests] == ["http://127.0.0.1:8080/hook"]
