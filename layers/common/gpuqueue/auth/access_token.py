"""Cognito access tokens checked in code, as the HTTP API's JWT authorizer checks them.

WebSocket APIs have no JWT authorizer, so the `$connect` function verifies the token itself:
an RS256 signature by a key of the user pool's JWKS, the pool's issuer, not expired,
`token_use` = access and `client_id` = the stack's app client (access tokens carry no `aud`).
The JWKS is fetched once per container and again only for a key id it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

JWKS_PATH = "/.well-known/jwks.json"
JWKS_TIMEOUT_SECONDS = 3
JWKS_CACHE_SECONDS = 3600
ACCESS_TOKEN_USE = "access"  # noqa: S105 - a claim value, not a secret


class InvalidToken(Exception):
    """The token is missing, malformed, forged, expired or not ours: refuse the caller."""


@dataclass(frozen=True)
class AccessClaims:
    sub: str
    username: str | None
    expires_at: int


def bearer_token(headers: Mapping[str, str] | None, query: Mapping[str, str] | None) -> str | None:
    """The token a WebSocket client sent: `?token=` (browsers cannot set headers on a
    WebSocket), else `Authorization: Bearer ...` (header names are case-insensitive)."""
    token = (query or {}).get("token")
    if token:
        return token.strip()
    for name, value in (headers or {}).items():
        if name.lower() == "authorization":
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    return None


class AccessTokenVerifier:
    def __init__(self, *, issuer: str, client_id: str, jwks: jwt.PyJWKClient) -> None:
        self._issuer = issuer.rstrip("/")
        self._client_id = client_id
        self._jwks = jwks

    @classmethod
    def for_user_pool(
        cls, *, issuer: str, client_id: str, jwks_url: str | None = None
    ) -> AccessTokenVerifier:
        url = jwks_url or issuer.rstrip("/") + JWKS_PATH
        jwks = jwt.PyJWKClient(
            url, cache_jwk_set=True, lifespan=JWKS_CACHE_SECONDS, timeout=JWKS_TIMEOUT_SECONDS
        )
        return cls(issuer=issuer, client_id=client_id, jwks=jwks)

    def verify(self, token: str | None) -> AccessClaims:
        """The token's claims, or InvalidToken. The JWKS being unreachable is our fault, not
        the caller's: PyJWKClientConnectionError goes up as it is."""
        if not token:
            raise InvalidToken("no token")
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                issuer=self._issuer,
                options={
                    "require": ["exp", "iss", "sub", "token_use", "client_id"],
                    "verify_aud": False,  # access tokens carry client_id, checked below
                },
            )
        except jwt.PyJWKClientConnectionError:
            raise
        except jwt.PyJWTError as error:
            raise InvalidToken(str(error)) from error
        if claims["token_use"] != ACCESS_TOKEN_USE:
            raise InvalidToken("not an access token")
        if claims["client_id"] != self._client_id:
            raise InvalidToken("issued to another client")
        username = claims.get("username")
        return AccessClaims(
            sub=str(claims["sub"]),
            username=str(username) if username is not None else None,
            expires_at=int(claims["exp"]),
        )
