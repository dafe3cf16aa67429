"""The account routes, one call each: sign-up, its confirmation and sign-in in the user
directory (Cognito), each under its sign-in limits (SignInThrottle): every registration
counts against its source; only a failed sign-in spends the username's and the source's
tokens."""

from __future__ import annotations

from gpuqueue.auth.sign_in_throttle import SignInThrottle
from gpuqueue.auth.user_directory import UserDirectory
from gpuqueue.models import (
    Credentials,
    Registration,
    SignUpConfirmation,
    SignUpPending,
    TokenResponse,
)


class Accounts:
    def __init__(self, directory: UserDirectory, throttle: SignInThrottle) -> None:
        self._directory = directory
        self._throttle = throttle

    def register(self, registration: Registration, *, source: str) -> TokenResponse | SignUpPending:
        """Registered and signed in, or (sign-ups verified by e-mail) a code on its way."""
        return self._throttle.register(source, lambda: self._directory.register(registration))

    def confirm(self, confirmation: SignUpConfirmation) -> TokenResponse:
        return self._directory.confirm(confirmation)

    def login(self, credentials: Credentials, *, source: str) -> TokenResponse:
        return self._throttle.login(
            credentials.username, source, lambda: self._directory.login(credentials)
        )
