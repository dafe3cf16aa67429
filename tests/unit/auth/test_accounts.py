"""Accounts: each account route's directory call runs under the right sign-in limit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import pytest

from gpuqueue.auth.accounts import Accounts
from gpuqueue.errors import RateLimited
from gpuqueue.models import (
    Credentials,
    Registration,
    SignUpConfirmation,
    TokenResponse,
)

T = TypeVar("T")
TOKEN = TokenResponse(token="a", expires_in=3600)


class Throttle:
    """SignInThrottle's two gates, recording what each was asked; `refuse`: both refuse."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.asked: list[tuple[str, ...]] = []

    def register(self, source: str, attempt: Callable[[], T]) -> T:
        self.asked.append(("register", source))
        if self.refuse:
            raise RateLimited("slow down", retry_after_seconds=60, headers={})
        return attempt()

    def login(self, username: str, source: str, attempt: Callable[[], T]) -> T:
        self.asked.append(("login", username, source))
        if self.refuse:
            raise RateLimited("slow down", retry_after_seconds=60, headers={})
        return attempt()


class Directory:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def register(self, registration: Registration) -> TokenResponse:
        self.calls.append(f"register {registration.username}")
        return TOKEN

    def confirm(self, confirmation: SignUpConfirmation) -> TokenResponse:
        self.calls.append(f"confirm {confirmation.username}")
        return TOKEN

    def login(self, credentials: Credentials) -> TokenResponse:
        self.calls.append(f"login {credentials.username}")
        return TOKEN


def _accounts(throttle: Throttle, directory: Directory) -> Accounts:
    return Accounts(cast(Any, directory), cast(Any, throttle))


REGISTRATION = Registration(username="alice", password="a long passphrase 42")
CREDENTIALS = Credentials(username="alice", password="a long passphrase 42")


def test_a_registration_counts_against_its_source_then_reaches_the_directory():
    throttle, directory = Throttle(), Directory()

    assert _accounts(throttle, directory).register(REGISTRATION, source="203.0.113.9") == TOKEN
    assert throttle.asked == [("register", "203.0.113.9")]
    assert directory.calls == ["register alice"]


def test_a_sign_in_is_limited_by_username_and_source():
    throttle, directory = Throttle(), Directory()

    assert _accounts(throttle, directory).login(CREDENTIALS, source="203.0.113.9") == TOKEN
    assert throttle.asked == [("login", "alice", "203.0.113.9")]
    assert directory.calls == ["login alice"]


def test_a_refused_attempt_never_reaches_the_directory():
    throttle, directory = Throttle(refuse=True), Directory()
    accounts = _accounts(throttle, directory)

    with pytest.raises(RateLimited):
        accounts.register(REGISTRATION, source="203.0.113.9")
    with pytest.raises(RateLimited):
        accounts.login(CREDENTIALS, source="203.0.113.9")
    assert directory.calls == []


def test_a_confirmation_is_not_throttled():
    throttle, directory = Throttle(refuse=True), Directory()

    confirmation = SignUpConfirmation(username="alice", code="123456", password="pw long 42")
    assert _accounts(throttle, directory).confirm(confirmation) == TOKEN
    assert throttle.asked == []
