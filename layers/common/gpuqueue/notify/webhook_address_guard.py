"""Which addresses a webhook may connect to: global unicast only (not private, loopback,
link-local, multicast or reserved); an IPv6 form embedding IPv4 (mapped, compatible, NAT64,
6to4, Teredo) is judged by the IPv4 inside, since a connection there reaches that address."""

from __future__ import annotations

import ipaddress

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
