"""PushConnections: a `$connect` is recorded under its verified user, or not at all."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

import pytest

from gpuqueue.auth.access_token import AccessClaims, InvalidToken
from gpuqueue.notify.push import ConnectEvent
from gpuqueue.notify.push_connections import PushConnections
from gpuqueue_testing import load_event


class OneTokenVerifier:
    """Accepts exactly one token, as the user pool's verifier accepts only its own."""

    def __init__(self, token: str) -> None:
        self._token = token

    def verify(self, token: str | None) -> AccessClaims:
        if token != self._token:
            raise InvalidToken("not ours")
        return AccessClaims(sub="user-1", username="alice", expires_at=2_000_000_000)


class StoreRecorder:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, datetime | None]] = []

    def put(self, connection_id: str, user_id: str, connected_at: datetime | None = None) -> None:
        self.rows.append((connection_id, user_id, connected_at))


def _request(token: str) -> ConnectEvent:
    event = load_event("connect_token")
    event["queryStringParameters"] = {"token": token}
    return ConnectEvent.model_validate(event)


def test_a_verified_caller_has_the_connection_recorded_under_their_user():
    store = StoreRecorder()
    connections = PushConnections(cast(Any, OneTokenVerifier("good")), cast(Any, store))

    claims = connections.open(_request("good"))

    assert claims.sub == "user-1"
    [(connection_id, user_id, connected_at)] = store.rows
    assert (connection_id, user_id) == ("Yx2FhdqJoAMCJEQ=", "user-1")
    assert connected_at is not None


def test_a_bad_token_records_nothing():
    store = StoreRecorder()
    connections = PushConnections(cast(Any, OneTokenVerifier("good")), cast(Any, store))

    with pytest.raises(InvalidToken):
        connections.open(_request("forged"))
    assert store.rows == []
