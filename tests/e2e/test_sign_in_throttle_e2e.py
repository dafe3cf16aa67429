"""Failed logins over HTTP on the local stack: a username is locked after its failures,
right password or not, and an unknown one answers the same."""

from __future__ import annotations

import uuid

import pytest
import requests

from .conftest import LocalStackProcess, register_user

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

USERNAME_BURST, USERNAME_REFILL = 5, 300  # the template's defaults


def _login(stack: LocalStackProcess, username: str, password: str) -> requests.Response:
    return requests.post(
        f"{stack.api}/login", json={"username": username, "password": password}, timeout=30
    )


def test_a_username_is_locked_after_its_failures_even_for_the_right_password(local_stack):
    user = register_user(local_stack)
    ghost = f"ghost{uuid.uuid4().hex[:10]}"

    for name in (user.username, ghost):
        answers = [
            _login(local_stack, name, "wrong-horse-battery-9") for _ in range(USERNAME_BURST)
        ]
        assert [a.status_code for a in answers] == [401] * USERNAME_BURST

    right = _login(local_stack, user.username, user.password)
    unknown = _login(local_stack, ghost, user.password)

    for refused in (right, unknown):
        assert refused.status_code == 429, refused.text
        assert refused.json() == {
            "error": "too many failed logins: try again later",
            "code": "RATE_LIMITED",
        }
        assert 1 <= int(refused.headers["Retry-After"]) <= USERNAME_REFILL
    assert "token" not in right.json()
