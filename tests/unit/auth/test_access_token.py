"""Access tokens checked by the WebSocket $connect function: what is let in, what is refused.

The JWKS is real PyJWKClient logic (key selection by kid, refetch on an unknown kid) over a
key set served from memory: no network.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gpuqueue.auth.access_token import AccessTokenVerifier, InvalidToken, bearer_token

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
CLIENT_ID = "4h5j6k7l8m9n0p1q2r3s4t5u6v"
KID = "key-1"


class InMemoryJwks(jwt.PyJWKClient):
    """PyJWKClient whose key set comes from memory (fetches are counted)."""

    def __init__(self, *keys: tuple[str, rsa.RSAPrivateKey], reachable: bool = True) -> None:
        super().__init__(f"{ISSUER}/.well-known/jwks.json")
        self.keys = dict(keys)
        self.reachable = reachable
        self.fetches = 0

    def fetch_data(self) -> Any:
        self.fetches += 1
        if not self.reachable:
            raise jwt.PyJWKClientConnectionError("Fail to fetch data from the url, err: refused")
        public = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            public.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": public}


@pytest.fixture(scope="module")
def pool_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks(pool_key: rsa.RSAPrivateKey) -> InMemoryJwks:
    return InMemoryJwks((KID, pool_key))


@pytest.fixture
def verifier(jwks: InMemoryJwks) -> AccessTokenVerifier:
    return AccessTokenVerifier(issuer=ISSUER, client_id=CLIENT_ID, jwks=jwks)


def access_token(key: rsa.RSAPrivateKey, *, kid: str = KID, **claims: Any) -> str:
    """A Cognito access token (a claim given as None is left out)."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "7c1e2f3a-0000-4000-8000-000000000001",
        "iss": ISSUER,
        "client_id": CLIENT_ID,
        "token_use": "access",
        "scope": "aws.cognito.signin.user.admin",
        "username": "alice",
        "iat": now,
        "exp": now + 3600,
    }
    base.update(claims)
    payload = {k: v for k, v in base.items() if v is not None}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


# --- where the token comes from -------------------------------------------------------------


def test_the_token_comes_from_the_query_string_first() -> None:
    assert bearer_token({"Authorization": "Bearer from-header"}, {"token": "from-query"}) == (
        "from-query"
    )


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
def test_a_bearer_header_is_accepted_whatever_its_case(name: str) -> None:
    assert bearer_token({name: "Bearer abc.def.ghi"}, None) == "abc.def.ghi"


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        (None, None),
        ({}, {}),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer "}, None),
        (None, {"token": ""}),
    ],
)
def test_no_usable_token_is_none(headers: dict[str, str] | None, query: dict[str, str]) -> None:
    assert bearer_token(headers, query) is None


# --- what is let in -------------------------------------------------------------------------


def test_a_valid_access_token_gives_its_user(
    verifier: AccessTokenVerifier, pool_key: rsa.RSAPrivateKey
) -> None:
    claims = verifier.verify(access_token(pool_key))

    assert claims.sub == "7c1e2f3a-0000-4000-8000-000000000001"
    assert claims.username == "alice"
    assert claims.expires_at > time.time()


def test_the_key_set_is_fetched_once_for_many_tokens(
    verifier: AccessTokenVerifier, jwks: InMemoryJwks, pool_key: rsa.RSAPrivateKey
) -> None:
    for user in range(5):
        verifier.verify(access_token(pool_key, sub=f"user-{user}"))

    assert jwks.fetches == 1


def test_a_rotated_key_is_found_by_fetching_the_key_set_again(
    verifier: AccessTokenVerifier,
    jwks: InMemoryJwks,
    pool_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
) -> None:
    verifier.verify(access_token(pool_key))
    jwks.keys["key-2"] = other_key  # Cognito published a new key

    assert verifier.verify(access_token(other_key, kid="key-2")).sub
    assert jwks.fetches == 2


def test_the_jwks_url_defaults_to_the_issuers_well_known_path() -> None:
    verifier = AccessTokenVerifier.for_user_pool(issuer=ISSUER + "/", client_id=CLIENT_ID)

    assert verifier._jwks.uri == f"{ISSUER}/.well-known/jwks.json"


# --- what is refused ------------------------------------------------------------------------


def _unsigned(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'kid': KID})}.{part(claims)}."


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("expired", lambda key: access_token(key, exp=int(time.time()) - 5)),
        ("no expiry", lambda key: access_token(key, exp=None)),
        ("another pool", lambda key: access_token(key, iss=ISSUER.replace("AbCdEf", "Other"))),
        ("an ID token", lambda key: access_token(key, token_use="id", aud=CLIENT_ID)),
        ("another app client", lambda key: access_token(key, client_id="someone-elses")),
        ("no client id", lambda key: access_token(key, client_id=None)),
        ("no subject", lambda key: access_token(key, sub=None)),
        ("an unknown key id", lambda key: access_token(key, kid="not-published")),
        ("not a JWT", lambda key: "not-a-jwt"),
        ("unsigned (alg none)", lambda key: _unsigned({"sub": "x", "iss": ISSUER})),
    ],
)
def test_a_token_that_is_not_a_valid_access_token_of_the_pool_is_refused(
    verifier: AccessTokenVerifier, pool_key: rsa.RSAPrivateKey, case: str, make: Any
) -> None:
    with pytest.raises(InvalidToken):
        verifier.verify(make(pool_key))


def test_a_token_signed_by_another_key_under_the_pools_key_id_is_refused(
    verifier: AccessTokenVerifier, other_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(InvalidToken):
        verifier.verify(access_token(other_key))


def test_a_tampered_payload_is_refused(
    verifier: AccessTokenVerifier, pool_key: rsa.RSAPrivateKey
) -> None:
    header, _, signature = access_token(pool_key).split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "someone-else"}).encode()).decode()

    with pytest.raises(InvalidToken):
        verifier.verify(f"{header}.{forged.rstrip('=')}.{signature}")


def test_an_hs256_token_keyed_with_the_public_key_is_refused(
    verifier: AccessTokenVerifier, pool_key: rsa.RSAPrivateKey
) -> None:
    # The algorithm-confusion attack: only RS256 is accepted.
    token = jwt.encode(
        {"sub": "x", "iss": ISSUER, "exp": int(time.time()) + 60},
        "secret-derived-from-the-public-key",
        algorithm="HS256",
        headers={"kid": KID},
    )

    with pytest.raises(InvalidToken):
        verifier.verify(token)


@pytest.mark.parametrize("token", [None, ""])
def test_no_token_is_refused(verifier: AccessTokenVerifier, token: str | None) -> None:
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_an_unreachable_key_set_is_a_server_fault_not_a_refusal(
    pool_key: rsa.RSAPrivateKey,
) -> None:
    verifier = AccessTokenVerifier(
        issuer=ISSUER, client_id=CLIENT_ID, jwks=InMemoryJwks((KID, pool_key), reachable=False)
    )

    with pytest.raises(jwt.PyJWKClientConnectionError):
        verifier.verify(access_token(pool_key))
