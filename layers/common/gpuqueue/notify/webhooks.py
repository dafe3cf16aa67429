"""Webhooks: a signed POST to the submitter's URL when their task reaches a final state.

Path: the tasks table's stream -> TaskEventsFunction (`WebhookNotifier`, a task-end listener)
-> the webhook queue -> WebhookFunction (`WebhookDeliverer`) -> the receiver. Nothing on the
dispatcher's hot path.

- Signature: `X-Gpuqueue-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]`, each v1 an
  HMAC-SHA256 of `f"{t}.".encode() + body` under one of the stack's signing secrets (the
  current one, and the previous one while a rotation settles). Receivers check one matches
  and that t is within 5 minutes (replay protection).
- Retries: a failed attempt (connection error, timeout, a non-2xx or a redirect) comes back
  after a capped exponential backoff with jitter; the schedule spans more than an hour, then
  the delivery is dead-lettered. Every attempt is logged on the task (`deliveries`).
- SSRF guard: the URL must be https and every address its host resolves to must be global
  (not private, loopback, link-local, multicast or reserved; an IPv6 form embedding IPv4 -
  mapped, compatible, NAT64, 6to4, Teredo - is judged by the IPv4 inside), checked at submit
  and again before each attempt, whose connection goes to the addresses that check saw
  (pinned: no second lookup to rebind). The local stack's flag allows http and loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import urlsplit

import urllib3
from aws_lambda_powertools import Logger
from pydantic import BaseModel

from gpuqueue.errors import InvalidInput
from gpuqueue.models import Task, TaskView, WebhookAttempt, WebhookEvent, iso, utc_now

logger = Logger(child=True)

SIGNATURE_HEADER = "X-Gpuqueue-Signature"
EVENT_HEADER = "X-Gpuqueue-Event"
DELIVERY_HEADER = "X-Gpuqueue-Delivery"
# Attempts per delivery; with RETRY_BASE/RETRY_CAP and jitter of 0.5-1.0x the waits between
# them add up to more than an hour even at the low end (see `retry_schedule_floor`).
MAX_ATTEMPTS = 13
RETRY_BASE_SECONDS = 30.0
RETRY_CAP_SECONDS = 900.0
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_LOGGED_ATTEMPTS = 100  # per task: the delivery log stays small
ERROR_CHARS = 300

Resolver = Callable[[str, int], Sequence[str]]


# pragma: no mutate start (make mutate covers the signing only)
def resolve_host(host: str, port: int) -> list[str]:
    """Every address the host resolves to (A and AAAA)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


# IPv6 prefixes that carry an IPv4 address in their low 32 bits: NAT64 (RFC 6052's
# well-known prefix and RFC 8215's local-use one) and the deprecated IPv4-compatible form.
# A connection there reaches the IPv4 address, so that address is the one judged.
NAT64_PREFIXES = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address stands for: IPv4-mapped, IPv4-compatible, NAT64,
    6to4 and Teredo (server and client); () for a plain IPv6 address."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    low = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    if any(address in prefix for prefix in NAT64_PREFIXES):
        return (low,)
    # :: and ::1 are IPv6's own unspecified and loopback addresses, not IPv4-compatible.
    if address in IPV4_COMPATIBLE and int(address) > 1:
        return (low,)
    return ()


def is_public(address: IpAddress) -> bool:
    """Global unicast. The explicit flags back up `is_global`, whose tables changed between
    Python releases."""
    return address.is_global and not (
        address.is_multicast
        or address.is_private
        or address.is_reserved
        or address.is_link_local
        or address.is_loopback
        or address.is_unspecified
    )


def address_allowed(text: str, *, allow_loopback: bool) -> bool:
    """May a webhook connect to this address? An IPv6 form embedding IPv4 is judged by the
    IPv4 address(es) it embeds; any other address by itself."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    judged: tuple[IpAddress, ...] = (address,)
    if isinstance(address, ipaddress.IPv6Address):
        judged = embedded_ipv4(address) or judged
    return all(is_public(a) or (allow_loopback and a.is_loopback) for a in judged)


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL as checked: the addresses its host resolved to, every one allowed. A
    delivery connects to these addresses, never to a fresh resolution of the name (which
    could answer otherwise: DNS rebinding)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def request_target(self) -> str:
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def checked_webhook_target(
    url: str, *, allow_loopback: bool, resolve: Resolver = resolve_host
) -> WebhookTarget:
    """The URL and the addresses a delivery may connect to (one resolution, every answer
    allowed), else InvalidInput naming `webhook_url`."""

    def refuse(reason: str) -> InvalidInput:
        return InvalidInput(f"webhook_url: {reason}", field="webhook_url")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise refuse("not a valid URL") from None
    schemes = ("https", "http") if allow_loopback else ("https",)
    if parts.scheme not in schemes:
        raise refuse("must be an https URL")
    if not parts.hostname or parts.username or parts.password:
        raise refuse("needs a host and no credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = tuple(resolve(parts.hostname, port))
    except (OSError, UnicodeError):
        raise refuse(f"the host {parts.hostname} does not resolve") from None
    if not addresses:
        raise refuse(f"the host {parts.hostname} does not resolve")
    for text in addresses:
        try:
            allowed = address_allowed(text, allow_loopback=allow_loopback)
        except ValueError:
            raise refuse(f"the host {parts.hostname} resolves to {text!r}") from None
        if not allowed:
            raise refuse(
                f"the host resolves to {text}, a private, loopback, link-local or reserved "
                "address (or an IPv6 form embedding one); webhooks go to public addresses only"
            )
    return WebhookTarget(
        url=url, scheme=parts.scheme, host=parts.hostname, port=port, addresses=addresses
    )


def check_webhook_url(url: str, *, allow_loopback: bool, resolve: Resolver = resolve_host) -> str:
    """The URL if a delivery may go there, else InvalidInput naming `webhook_url`."""
    return checked_webhook_target(url, allow_loopback=allow_loopback, resolve=resolve).url


# pragma: no mutate end
def sign(secrets: Sequence[str], body: bytes, *, timestamp: int) -> str:
    """The X-Gpuqueue-Signature value: one v1 per secret (current first)."""
    signed = f"{timestamp}.".encode() + body
    parts = [f"t={timestamp}"]
    parts += [
        "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets
    ]
    return ",".join(parts)


# pragma: no mutate start (make mutate covers the signing only)
def retry_delay_seconds(
    attempt: int,
    *,
    base: float = RETRY_BASE_SECONDS,
    cap: float = RETRY_CAP_SECONDS,
    rng: random.Random | None = None,
) -> int:
    """The wait after failed attempt `attempt` (1-based): base x 2^(attempt-1), capped, then
    jittered to 50-100 % so receivers recovering from an outage are not hit all at once."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return round(ceiling * float((rng or random).uniform(0.5, 1.0)))


def retry_schedule_floor(
    *,
    attempts: int = MAX_ATTEMPTS,
    base: float = RETRY_BASE_SECONDS,
    cap: float = RETRY_CAP_SECONDS,
) -> float:
    """The shortest time a delivery keeps being retried (every jitter at its low end)."""
    return float(sum(0.5 * min(cap, base * 2.0 ** (n - 1)) for n in range(1, attempts)))


class DeliveryMessage(BaseModel):
    """What travels on the webhook queue: which task, which event, which delivery."""

    task_id: str
    event: WebhookEvent
    delivery_id: str


def delivery_id_for(task_id: str, event: WebhookEvent) -> str:
    """The same id for the same task and event: a repeated stream record makes a message with
    the same delivery id, which the deliverer recognises as already delivered."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"gpuqueue:{task_id}:{event.value}"))


class MessageSender(Protocol):
    def send(self, message: DeliveryMessage) -> None: ...


class WebhookNotifier:
    """A task-end listener: a delivery message for each task that asked for this event."""

    def __init__(self, sender: MessageSender) -> None:
        self._sender = sender

    def tasks_ended(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            self.task_ended(task)

    def task_ended(self, task: Task) -> None:
        event = WebhookEvent.for_status(task.status)
        if not task.wants_webhook(event):
            return
        self._sender.send(
            DeliveryMessage(
                task_id=task.task_id, event=event, delivery_id=delivery_id_for(task.task_id, event)
            )
        )


# pragma: no mutate end
def payload(task: Task, message: DeliveryMessage) -> bytes:
    body = {
        "event": message.event.value,
        "delivery_id": message.delivery_id,
        "task": TaskView.of(task).model_dump(mode="json"),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class HttpAnswer:
    status_code: int | None  # None: no answer (connection error, timeout)
    error: str | None = None


class WebhookPoster(Protocol):
    def post(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> HttpAnswer: ...


class DeliveryLog(Protocol):
    def get(self, task_id: str) -> Task | None: ...

    def record_delivery(
        self, task_id: str, attempt: WebhookAttempt, *, max_entries: int
    ) -> bool: ...


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GAVE_UP = "gave_up"
    SKIPPED = "skipped"  # already delivered, or nothing to deliver


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    delay_seconds: int = 0


class WebhookDeliverer:
    def __init__(
        self,
        *,
        tasks: DeliveryLog,
        poster: WebhookPoster,
        secrets: Callable[[], Sequence[str]],
        allow_loopback: bool = False,
        resolve: Resolver = resolve_host,
        max_attempts: int = MAX_ATTEMPTS,
        retry_base_seconds: float = RETRY_BASE_SECONDS,
        retry_cap_seconds: float = RETRY_CAP_SECONDS,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        # pragma: no mutate block (make mutate covers the signing only)
        self._tasks = tasks
        self._poster = poster
        self._secrets = secrets
        self._allow_loopback = allow_loopback
        self._resolve = resolve
        self._max_attempts = max_attempts
        self._base = retry_base_seconds
        self._cap = retry_cap_seconds
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def deliver(self, message: DeliveryMessage, *, attempt: int) -> Result:
        """One attempt (`attempt` is 1-based: the message's receive count)."""
        # pragma: no mutate block (make mutate covers the signing only)
        task = self._tasks.get(message.task_id)
        if task is None or task.webhook_url is None:
            return Result(Outcome.SKIPPED)
        if any(a.ok and a.delivery_id == message.delivery_id for a in task.deliveries):
            return Result(Outcome.SKIPPED)  # a repeated message for a delivery that landed
        started = self._clock()
        answer = self._attempt(task, message, started)
        ok = answer.status_code is not None and 200 <= answer.status_code < 300
        last = not ok and attempt >= self._max_attempts
        self._tasks.record_delivery(
            task.task_id,
            WebhookAttempt(
                delivery_id=message.delivery_id,
                event=message.event,
                attempt=attempt,
                at=iso(utc_now()),
                ok=ok,
                status_code=answer.status_code,
                error=(answer.error or None) and str(answer.error)[:ERROR_CHARS],
                duration_ms=round((self._clock() - started) * 1000),
                gave_up=last,
            ),
            max_entries=MAX_LOGGED_ATTEMPTS,
        )
        if ok:
            return Result(Outcome.DELIVERED)
        if last:
            return Result(Outcome.GAVE_UP)
        delay = retry_delay_seconds(attempt, base=self._base, cap=self._cap, rng=self._rng)
        return Result(Outcome.RETRY, delay_seconds=delay)

    def _attempt(self, task: Task, message: DeliveryMessage, now: float) -> HttpAnswer:
        url = task.webhook_url or ""
        try:
            # Again at delivery, and the poster connects to exactly the addresses checked
            # here: the name may resolve elsewhere now, or on the next lookup (DNS rebinding).
            target = checked_webhook_target(
                url, allow_loopback=self._allow_loopback, resolve=self._resolve
            )
        except InvalidInput as refused:
            return HttpAnswer(status_code=None, error=refused.message)
        body = payload(task, message)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "gpuqueue-webhooks/1",
            SIGNATURE_HEADER: sign(list(self._secrets()), body, timestamp=int(now)),
            EVENT_HEADER: message.event.value,
            DELIVERY_HEADER: message.delivery_id,
        }
        return self._poster.post(target, body, headers)


# pragma: no mutate start (make mutate covers the signing only)
def new_delivery(task: Task) -> DeliveryMessage:
    """A redelivery the owner asked for: the task's final event under a fresh delivery id."""
    return DeliveryMessage(
        task_id=task.task_id,
        event=WebhookEvent.for_status(task.status),
        delivery_id=str(uuid.uuid4()),
    )


def as_log(task: Task) -> dict[str, Any]:
    """GET /api/v1/tasks/{id}/deliveries."""
    return {
        "task_id": task.task_id,
        "webhook_url": task.webhook_url,
        "webhook_events": [e.value for e in task.webhook_events] if task.webhook_events else None,
        "deliveries": [a.model_dump(mode="json", exclude_none=True) for a in task.deliveries],
    }


# --- AWS and HTTP adapters ------------------------------------------------------------------


class PinnedPoster:
    """POST to the addresses the guard checked, never to a new resolution of the name: http
    connects to the address and sends the name in Host; https connects to the address with
    the name as SNI and verifies the certificate against the name. No redirects followed (a
    3xx counts as a failure: the receiver must answer at the URL it gave), no retries here
    (the queue retries), answers read no further than their status. An address that refuses
    the connection hands over to the next checked one within the same time budget."""

    def __init__(
        self,
        *,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        ca_certs: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import certifi  # noqa: PLC0415 - only the webhook function needs it

        self._timeout = timeout
        self._ca_certs = ca_certs or certifi.where()  # the bundle requests used
        self._clock = clock

    def pool(self, target: WebhookTarget, address: str) -> urllib3.HTTPConnectionPool:
        """A one-connection pool to `address`, speaking to the target's host name."""
        host = address.split("%", 1)[0]
        if target.scheme == "https":
            return urllib3.HTTPSConnectionPool(
                host,
                target.port,
                maxsize=1,
                retries=False,
                cert_reqs="CERT_REQUIRED",
                ca_certs=self._ca_certs,
                server_hostname=target.host,  # SNI
                assert_hostname=target.host,  # the certificate names the host, not the IP
            )
        return urllib3.HTTPConnectionPool(host, target.port, maxsize=1, retries=False)

    def post(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        deadline = self._clock() + self._timeout
        sent = {**headers, "Host": target.host_header}
        error = "no address to connect to"
        for address in target.addresses:
            left = deadline - self._clock()
            if left <= 0:
                break
            with self.pool(target, address) as pool:
                try:
                    response = pool.urlopen(
                        "POST",
                        target.request_target,
                        body=body,
                        headers=sent,
                        redirect=False,
                        retries=False,
                        timeout=urllib3.Timeout(total=left),
                        preload_content=False,
                        assert_same_host=False,
                    )
                except urllib3.exceptions.NewConnectionError as failed:
                    error = f"{type(failed).__name__}: {failed}"
                    continue  # nothing was sent: the next checked address may answer
                except urllib3.exceptions.HTTPError as failed:
                    return HttpAnswer(status_code=None, error=f"{type(failed).__name__}: {failed}")
                status = int(response.status)
                response.close()
            if 200 <= status < 300:
                return HttpAnswer(status_code=status)
            return HttpAnswer(status_code=status, error=f"the receiver answered HTTP {status}")
        return HttpAnswer(status_code=None, error=error)


class SqsDeliverySender:
    def __init__(self, sqs: Any, queue_url: str) -> None:
        self._sqs = sqs
        self._url = queue_url

    def send(self, message: DeliveryMessage) -> None:
        self._sqs.send_message(QueueUrl=self._url, MessageBody=message.model_dump_json())


# pragma: no mutate end
class SigningSecrets:
    """The stack's signing secrets from Secrets Manager: AWSCURRENT, and AWSPREVIOUS while a
    rotation settles (both sign, so receivers can switch at their own pace). Cached per
    container for `ttl_seconds`, so a rotation is picked up within that time."""

    def __init__(
        self,
        client: Any,
        secret_id: str,
        *,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._secret_id = secret_id
        self._ttl = ttl_seconds
        self._clock = clock
        self._cached: tuple[float, list[str]] | None = None

    def __call__(self) -> list[str]:
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < self._ttl:
            return self._cached[1]
        secrets = [self._value("AWSCURRENT")]
        try:
            previous = self._value("AWSPREVIOUS")
        except self._client.exceptions.ResourceNotFoundException:
            previous = None  # never rotated
        if previous and previous not in secrets:
            secrets.append(previous)
        self._cached = (now, secrets)
        return secrets

    def _value(self, stage: str) -> str:
        answer = self._client.get_secret_value(SecretId=self._secret_id, VersionStage=stage)
        return str(answer["SecretString"])
