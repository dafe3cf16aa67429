"""SignInThrottle: failed logins per username and per source address, registrations per
source, as GCRA token buckets in the limits table (gpuqueue.intake.rate_limiter).

Logins: before Cognito sees the password, one token is taken from the source's bucket and
one from the username's; a login that fails with bad credentials keeps them spent, any other
outcome gives them back. So only failures count, yet N parallel guesses spend N tokens before
any reaches Cognito (check-then-count would let every request in flight through). While
either bucket is empty the answer is 429 + Retry-After, even with the right password.

The username's bucket is keyed by the username as typed, normalized (NFKC, case-folded) and
hashed, never by whether the account exists: an unknown name gets the same answers, the same
Retry-After, at the same moments. Hashed, so a row never holds a password typed into the
username field, and keys stay short.

Registrations: one token per attempt that reaches Cognito, from the source's bucket.

The source is API Gateway's `sourceIp`; an IPv6 address counts as its /64 (one subscriber's
usual allocation, which it can rotate through freely). Behind the optional CloudFront + WAF
(template.yaml, WafRateLimit > 0), `sourceIp` is a CloudFront edge: the client's address
comes from a header CloudFront's viewer-request function overwrites, trusted only when the
request carries the distribution's secret origin header. When that secret is configured a
request without it came around CloudFront (the execute-api URL) and is refused (403).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from gpuqueue.errors import Forbidden, InvalidCredentials, RateLimited
from gpuqueue.intake.rate_limiter import RateLimiter
from gpuqueue.store.limits_rows import LimitsRow

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

T = TypeVar("T")

# Set by CloudFront: the shared secret (origin custom header) and the viewer's address (a
# viewer-request function overwrites whatever the client sent under that name).
ORIGIN_VERIFY_HEADER = "x-origin-verify"
VIEWER_ADDRESS_HEADER = "x-gpuqueue-viewer-ip"
IPV6_PREFIX_LENGTH = 64

LOGIN_LIMITED = "too many failed logins: try again later"
REGISTER_LIMITED = "too many registrations from this address: try again later"


@dataclass(frozen=True)
class BucketSpec:
    """`burst` attempts at once, then one more every `refill_seconds`."""

    burst: int
    refill_seconds: float


def username_key(username: str) -> str:
    """The username's bucket: NFKC, case-folded, hashed (existence plays no part)."""
    normalized = unicodedata.normalize("NFKC", username).casefold()
    return hashlib.sha256(normalized.encode()).hexdigest()


def source_key(address: str) -> str:
    """An IPv4 address as itself, an IPv6 address as its /64; anything else verbatim."""
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return address.strip()[:64] or "unknown"
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        network = ipaddress.IPv6Network(f"{parsed}/{IPV6_PREFIX_LENGTH}", strict=False)
        return str(network)
    return str(parsed)


def client_address(source_ip: str, headers: Mapping[str, str], *, origin_secret: str | None) -> str:
    """The address the limits count against. With `origin_secret` (the API is behind
    CloudFront), a request without the secret is refused and the viewer header is trusted."""
    if origin_secret is None:
        return source_ip
    lowered = {name.lower(): value for name, value in headers.items()}
    presented = lowered.get(ORIGIN_VERIFY_HEADER, "")
    if not hmac.compare_digest(presented.encode(), origin_secret.encode()):
        raise Forbidden("this API is served through its CloudFront distribution: use that URL")
    return lowered.get(VIEWER_ADDRESS_HEADER) or source_ip


class SignInThrottle:
    def __init__(
        self,
        table: Table,
        *,
        login_per_username: BucketSpec,
        login_per_source: BucketSpec,
        register_per_source: BucketSpec,
        clock: Callable[[], float] = time.time,
    ) -> None:
        def bucket(spec: BucketSpec, rows: LimitsRow) -> RateLimiter:
            return RateLimiter(
                table,
                rate_per_second=1 / spec.refill_seconds,
                burst=spec.burst,
                clock=clock,
                rows=rows,
                refundable=True,
            )

        self._by_username = bucket(login_per_username, LimitsRow.LOGIN_USERNAME)
        self._login_by_source = bucket(login_per_source, LimitsRow.LOGIN_SOURCE)
        self._register_by_source = bucket(register_per_source, LimitsRow.REGISTER_SOURCE)

    def login(self, username: str, source: str, attempt: Callable[[], T]) -> T:
        """`attempt()` if both buckets hold a token; its bad-credentials failure spends them."""
        spent: list[tuple[RateLimiter, str]] = []
        for limiter, key in (
            (self._login_by_source, source_key(source)),
            (self._by_username, username_key(username)),
        ):
            decision = limiter.take(key)
            if not decision.allowed:
                self._give_back(spent)
                raise RateLimited(
                    LOGIN_LIMITED, retry_after_seconds=decision.retry_after_seconds, headers={}
                )
            spent.append((limiter, key))
        try:
            result = attempt()
        except InvalidCredentials:
            raise  # a failure: the tokens stay spent
        except BaseException:
            self._give_back(spent)
            raise
        self._give_back(spent)
        return result

    def register(self, source: str, attempt: Callable[[], T]) -> T:
        """`attempt()` if the source may register once more (every attempt counts)."""
        decision = self._register_by_source.take(source_key(source))
        if not decision.allowed:
            raise RateLimited(
                REGISTER_LIMITED, retry_after_seconds=decision.retry_after_seconds, headers={}
            )
        return attempt()

    @staticmethod
    def _give_back(spent: list[tuple[RateLimiter, str]]) -> None:
        for limiter, key in spent:
            limiter.give_back(key)
