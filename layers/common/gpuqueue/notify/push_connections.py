"""WebSocket `$connect` as one call: the caller's Cognito access token (`?token=` or
`Authorization: Bearer`) is verified, then the connection is recorded under its user."""

from __future__ import annotations

from gpuqueue.auth.access_token import AccessClaims, AccessTokenVerifier, bearer_token
from gpuqueue.notify.push import ConnectEvent, ConnectionStore


class PushConnections:
    def __init__(self, verifier: AccessTokenVerifier, store: ConnectionStore) -> None:
        self._verifier = verifier
        self._store = store

    def open(self, request: ConnectEvent) -> AccessClaims:
        """The caller's claims, their connection recorded; InvalidToken (and nothing
        recorded) when the token is missing or not a valid access token of the pool."""
        token = bearer_token(request.headers, request.query_string_parameters)
        claims = self._verifier.verify(token)
        context = request.request_context
        self._store.put(context.connection_id, claims.sub, context.connected_at)
        return claims
