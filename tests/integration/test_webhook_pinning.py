"""A webhook delivery connects to the address the SSRF guard checked, never to a second
lookup of the name (DNS rebinding): over real sockets on 127.0.0.1, with a resolver the test
controls standing in for DNS."""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gpuqueue.models import Task, TaskStatus, WebhookAttempt, WebhookEvent
from gpuqueue.notify.pinned_poster import PinnedPoster
from gpuqueue.notify.webhook_delivery import DeliveryOutcome, WebhookDeliverer
from gpuqueue.notify.webhook_messages import DeliveryMessage
from gpuqueue_local.standins.webhook_receiver import WebhookReceiver

PUBLIC = "93.184.215.14"  # global: the guard lets it through (no route here: fails at once)


class Log:
    """The task's delivery log, in memory."""

    def __init__(self, url: str) -> None:
        self.task = Task(
            task_id="t-1",
            user_id="u-1",
            status=TaskStatus.DONE,
            created_at="2026-11-23T10:00:00Z",
            updated_at="2026-11-23T10:00:05Z",
            webhook_url=url,
        )

    def get(self, task_id: str) -> Task | None:
        return self.task

    def record_delivery(self, task_id: str, attempt: WebhookAttempt, *, max_entries: int) -> bool:
        self.task = self.task.model_copy(update={"deliveries": [*self.task.deliveries, attempt]})
        return True


class Rebinding:
    """DNS under the test's control: each lookup gets the next answer (the last repeats)."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.lookups = 0

    def __call__(self, host: str, port: int) -> list[str]:
        answer = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return list(answer)


def deliver(
    url: str, resolve: Callable[[str, int], Sequence[str]], *, allow_loopback: bool, **poster
) -> tuple[DeliveryOutcome, Log]:
    log = Log(url)
    deliverer = WebhookDeliverer(
        tasks=log,
        poster=PinnedPoster(timeout=2.0, **poster),
        secrets=lambda: ["s3cret"],
        allow_loopback=allow_loopback,
        resolve=resolve,
    )
    message = DeliveryMessage(task_id="t-1", event=WebhookEvent.DONE, delivery_id="d-1")
    return deliver_once(deliverer, message), log


def deliver_once(deliverer: WebhookDeliverer, message: DeliveryMessage) -> DeliveryOutcome:
    return deliverer.deliver(message, attempt=1).outcome


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port on 127.0.0.1 that only counts connections (the kernel queues them)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def connections_to(server: socket.socket) -> int:
    count = 0
    while True:
        try:
            accepted, _ = server.accept()
        except BlockingIOError:
            return count
        accepted.close()
        count += 1


def test_a_name_checked_as_public_is_not_looked_up_again_and_never_reaches_loopback(listener):
    # Given a name the guard sees as public whose next lookups answer loopback (here: the
    # system's answer for localhost, and the test resolver's own second answer)
    port = listener.getsockname()[1]
    resolve = Rebinding([PUBLIC], ["127.0.0.1"])

    # When a delivery is attempted
    outcome, log = deliver(f"https://localhost:{port}/hook", resolve, allow_loopback=False)

    # Then it went to the checked public address only: nothing connected to loopback
    assert resolve.lookups == 1
    assert connections_to(listener) == 0
    assert outcome is DeliveryOutcome.RETRY
    assert log.task.deliveries[0].ok is False


def test_an_http_delivery_connects_to_the_checked_address_and_names_the_host():
    with WebhookReceiver() as receiver:
        url = f"http://hooks.invalid:{receiver.port}/hooks/gpuqueue?x=1"

        outcome, _ = deliver(url, Rebinding(["127.0.0.1"]), allow_loopback=True)

    assert outcome is DeliveryOutcome.DELIVERED
    [(headers, _, _)] = receiver.received
    assert headers["host"] == f"hooks.invalid:{receiver.port}"


def test_a_delivery_tries_the_next_checked_address_when_one_refuses_the_connection():
    refusing = socket.create_server(("127.0.0.2", 0))
    refusing.close()  # a port nothing listens on: connection refused
    with WebhookReceiver() as receiver:
        url = f"http://hooks.invalid:{receiver.port}/hooks/gpuqueue"
        resolve = Rebinding(["127.0.0.2", "127.0.0.1"])

        outcome, _ = deliver(url, resolve, allow_loopback=True)

    assert outcome is DeliveryOutcome.DELIVERED
    assert len(receiver.received) == 1


# --- https: SNI and the certificate checked against the host name, not the address ---------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def tls(tmp_path: Path) -> Callable[[str], tuple[ssl.SSLContext, str, list[str | None]]]:
    """A test CA; tls(name) -> (a server context serving a certificate for `name` signed by
    that CA, the CA's file for the client, the SNI names the server was sent)."""
    ca_key = _key()
    ca = (
        _certificate("gpuqueue test CA", "gpuqueue test CA", ca_key, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_pem(ca))

    def server(name: str) -> tuple[ssl.SSLContext, str, list[str | None]]:
        key = _key()
        leaf = (
            _certificate(name, "gpuqueue test CA", key, ca_key)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        chain = tmp_path / f"{name}.pem"
        chain.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + _pem(leaf)
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(chain)
        names: list[str | None] = []
        context.sni_callback = lambda _sock, sni, _ctx: names.append(sni)  # type: ignore[assignment,func-returns-value]
        return context, str(ca_file), names

    return server


def test_an_https_delivery_sends_the_host_as_sni_and_verifies_its_certificate(tls):
    context, ca_file, sni = tls("hooks.test")
    with WebhookReceiver(tls=context) as receiver:
        url = f"https://hooks.test:{receiver.port}/hooks/gpuqueue"

        outcome, _ = deliver(url, Rebinding(["127.0.0.1"]), allow_loopback=True, ca_certs=ca_file)

    assert outcome is DeliveryOutcome.DELIVERED
    assert sni == ["hooks.test"]
    [(headers, _, _)] = receiver.received
    assert headers["host"] == f"hooks.test:{receiver.port}"


def test_an_https_receiver_whose_certificate_names_another_host_gets_nothing(tls):
    context, ca_file, _ = tls("other.test")
    with WebhookReceiver(tls=context) as receiver:
        url = f"https://hooks.test:{receiver.port}/hooks/gpuqueue"

        outcome, log = deliver(url, Rebinding(["127.0.0.1"]), allow_loopback=True, ca_certs=ca_file)

    assert outcome is DeliveryOutcome.RETRY
    assert receiver.received == []
    error = log.task.deliveries[0].error or ""
    assert error.startswith("SSLError")
    assert "hooks.test" in error
