"""POST /register and /login against the template's Cognito user pool (on moto)."""

from __future__ import annotations

import base64
import json

import pytest


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    decoded: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def _post(h, route, body=None, raw_body=None):
    return h.call("auth_handler", "POST", route, body=body, raw_body=raw_body)


def test_register_returns_an_access_token_for_the_api_client(make_stack):
    h = make_stack()
    response = _post(h, "/register", {"username": "user1", "password": "pass1234"})
    assert response.status == 201
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] > 0
    claims = _claims(body["token"])
    assert claims["client_id"] == h.stack.ref("UserPoolClient")
    assert claims["token_use"] == "access"
    assert claims["sub"]


def test_login_after_register_gives_a_token_for_the_same_user(make_stack):
    h = make_stack()
    registered = _post(h, "/register", {"username": "user1", "password": "pass1234"}).json()
    login = _post(h, "/login", {"username": "user1", "password": "pass1234"})
    assert login.status == 200
    assert _claims(login.json()["token"])["sub"] == _claims(registered["token"])["sub"]


def test_duplicate_username_is_409(make_stack):
    h = make_stack()
    assert _post(h, "/register", {"username": "user1", "password": "pass1234"}).status == 201
    again = _post(h, "/register", {"username": "user1", "password": "other5678"})
    assert again.status == 409
    assert again.json()["code"] == "USER_EXISTS"
    assert again.json()["field"] == "username"


def test_weak_password_is_400_with_the_reason(make_stack):
    h = make_stack()
    response = _post(h, "/register", {"username": "user1", "password": "short"})
    assert response.status == 400
    body = response.json()
    assert body["field"] == "password"
    assert body["code"] == "WEAK_PASSWORD"
    assert "password" in body["error"].lower()


@pytest.mark.parametrize(
    ("username", "password"),
    [("user1", "wrong-pass1"), ("nobody", "pass1234")],
    ids=["wrong-password", "unknown-user"],
)
def test_bad_credentials_are_401_without_saying_which_part_was_wrong(
    make_stack, username, password
):
    h = make_stack()
    _post(h, "/register", {"username": "user1", "password": "pass1234"})
    response = _post(h, "/login", {"username": username, "password": password})
    assert response.status == 401
    assert response.json() == {
        "error": "invalid username or password",
        "code": "INVALID_CREDENTIALS",
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"password": "pass1234"}, "username"),
        ({"username": "user1"}, "password"),
        ({"username": "ab", "password": "pass1234"}, "username"),
        ({"username": "bad name!", "password": "pass1234"}, "username"),
    ],
)
def test_invalid_credentials_body_is_400_naming_the_field(make_stack, body, field):
    h = make_stack()
    response = _post(h, "/register", body)
    assert response.status == 400
    assert response.json()["field"] == field


def test_malformed_json_is_400(make_stack):
    h = make_stack()
    response = _post(h, "/login", raw_body="{not json")
    assert response.status == 400
    assert response.json()["code"] == "INVALID_JSON"
