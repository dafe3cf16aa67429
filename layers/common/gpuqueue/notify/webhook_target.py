"""A webhook URL checked against the SSRF guard, at submit and again before each attempt:
https only (the local stack's flag allows http and loopback), no credentials in it, and every
address its host resolves to allowed (`webhook_address_guard`). The addresses that check saw
are the ones a delivery connects to (pinned: no second lookup to rebind)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from gpuqueue.errors import InvalidInput
from gpuqueue.notify.webhook_address_guard import address_allowed

Resolver = Callable[[str, int], Sequence[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the host resolves to (A and AAAA)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


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
