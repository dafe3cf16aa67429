"""Issue 17's account findings, over the auth handler on the template's Cognito pool (moto):
weak passwords, look-alike usernames, and a sign-up that tells which names exist."""

from __future__ import annotations

import base64
import json

import boto3
import pytest

STRONG = "tulip-kettle-42"  # 15 characters, not a common password


def _post(h, route, body):
    return h.call("auth_handler", "POST", route, body=body)


def _sub(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sub"])


# --- passwords ------------------------------------------------------------------------------


def test_a_common_password_is_refused_even_where_the_length_allows_it(make_stack):
    # Given a stack whose operator lowered the minimum length to 8
    h = make_stack(endpoints=[], parameters={"PasswordMinimumLength": "8"})

    response = _post(h, "/register", {"username": "carol", "password": "passw0rd"})

    assert response.status == 400
    body = response.json()
    assert (body["code"], body["field"]) == ("WEAK_PASSWORD", "password")
    assert "common" in body["error"]


def test_a_long_password_cognito_accepts_registers_and_signs_in(make_stack):
    # Cognito takes passwords up to 256 characters (moto refused 99 and more: the local stack
    # and this harness patch it, `moto_cognito`); a PasswordMinimumLength of 99 needs them.
    h = make_stack(endpoints=[], parameters={"PasswordMinimumLength": "99"})
    password = "tulip-kettle-42-" * 15  # 240 characters

    registered = _post(h, "/register", {"username": "carol", "password": password})
    signed_in = _post(h, "/login", {"username": "carol", "password": password})

    assert registered.status == 201, registered.json()
    assert signed_in.status == 200


def test_a_common_password_of_twelve_characters_is_refused_by_default(make_stack):
    h = make_stack(endpoints=[])

    response = _post(h, "/register", {"username": "carol", "password": "password1234"})

    assert response.status == 400
    assert response.json()["field"] == "password"
    assert "common" in response.json()["error"]


@pytest.mark.parametrize("password", ["alice.smith", "alice.smith2024", "my-ALICE.SMITH-1"])
def test_a_password_equal_to_or_containing_the_username_is_refused(make_stack, password):
    h = make_stack(endpoints=[], parameters={"PasswordMinimumLength": "8"})

    response = _post(h, "/register", {"username": "alice.smith", "password": password})

    assert response.status == 400
    body = response.json()
    assert (body["code"], body["field"]) == ("WEAK_PASSWORD", "password")
    assert "username" in body["error"]


def test_the_default_policy_wants_twelve_characters(make_stack):
    h = make_stack(endpoints=[])

    short = _post(h, "/register", {"username": "dave", "password": "tulip-kett42"[:11]})
    enough = _post(h, "/register", {"username": "dave", "password": "tulip-kett42"})

    assert short.status == 400
    assert short.json()["field"] == "password"
    assert "at least 12 characters" in short.json()["error"]
    assert enough.status == 201
    pool = boto3.client("cognito-idp").describe_user_pool(UserPoolId=h.stack.ref("UserPool"))
    assert pool["UserPool"]["Policies"]["PasswordPolicy"]["MinimumLength"] == 12


# --- usernames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "username",
    ["\u0430dmin", "\u03b1dmin", "adm\u0131n", "ad\u200dmin", "-admin", "ad min"],
    ids=["cyrillic-a", "greek-alpha", "dotless-i", "zero-width-joiner", "leading-dash", "space"],
)
def test_a_look_alike_or_invisible_username_is_refused_naming_the_rule(make_stack, username):
    h = make_stack(endpoints=[])

    response = _post(h, "/register", {"username": username, "password": STRONG})

    assert response.status == 400
    body = response.json()
    assert (body["code"], body["field"]) == ("VALIDATION_ERROR", "username")
    assert "a-z, 0-9" in body["error"]
    users = boto3.client("cognito-idp").list_users(UserPoolId=h.stack.ref("UserPool"))
    assert users["Users"] == []


def test_fullwidth_and_upper_case_names_are_the_same_account(make_stack):
    h = make_stack(endpoints=[])
    registered = _post(h, "/register", {"username": "alice", "password": STRONG})
    assert registered.status == 201

    logins = [
        _post(h, "/login", {"username": name, "password": STRONG})
        for name in ("ALICE", "\uff41\uff4c\uff49\uff43\uff45", "\uff21lice")
    ]
    fullwidth = "\uff41\uff4c\uff49\uff43\uff45"
    again = _post(h, "/register", {"username": fullwidth, "password": STRONG})

    assert [login.status for login in logins] == [200, 200, 200]
    assert {_sub(login.json()["token"]) for login in logins} == {_sub(registered.json()["token"])}
    assert again.status == 409
    users = boto3.client("cognito-idp").list_users(UserPoolId=h.stack.ref("UserPool"))
    assert [user["Username"] for user in users["Users"]] == ["alice"]


def test_a_taken_name_is_a_409_that_does_not_repeat_the_name(make_stack):
    h = make_stack(endpoints=[])
    assert _post(h, "/register", {"username": "erin", "password": STRONG}).status == 201

    again = _post(h, "/register", {"username": "Erin", "password": STRONG + "x"})

    assert again.status == 409
    assert again.json() == {
        "error": "username is taken",
        "code": "USER_EXISTS",
        "field": "username",
    }


# --- SignUpVerification=email ---------------------------------------------------------------


def _email_stack(make_stack):
    return make_stack(endpoints=[], parameters={"SignUpVerification": "email"})


def test_email_sign_up_answers_the_same_for_a_new_and_a_taken_name(make_stack):
    h = _email_stack(make_stack)
    cognito, pool = boto3.client("cognito-idp"), h.stack.ref("UserPool")
    cognito.admin_create_user(UserPoolId=pool, Username="frank", MessageAction="SUPPRESS")

    new = _post(h, "/register", {"username": "grace", "password": STRONG, "email": "g@example.com"})
    taken = _post(
        h, "/register", {"username": "frank", "password": STRONG, "email": "x@example.com"}
    )

    assert (new.status, taken.status) == (202, 202)
    assert new.json() == taken.json()
    assert "token" not in new.json()
    grace = cognito.admin_get_user(UserPoolId=pool, Username="grace")
    assert grace["UserStatus"] == "UNCONFIRMED"
    assert {"Name": "email", "Value": "g@example.com"} in grace["UserAttributes"]


def test_email_sign_up_is_confirmed_by_the_code_and_then_signs_in(make_stack):
    h = _email_stack(make_stack)
    credentials = {"username": "heidi", "password": STRONG}
    assert _post(h, "/register", {**credentials, "email": "h@example.com"}).status == 202

    # Not confirmed yet: the right password is told to confirm, and confirms nothing itself
    before = _post(h, "/login", credentials)
    pool = h.stack.ref("UserPool")
    user = boto3.client("cognito-idp").admin_get_user(UserPoolId=pool, Username="heidi")
    assert user["UserStatus"] == "UNCONFIRMED"
    confirmed = _post(h, "/register/confirm", {**credentials, "code": "123456"})
    after = _post(h, "/login", credentials)

    assert before.status == 403
    assert before.json()["code"] == "ACCOUNT_NOT_CONFIRMED"
    assert "/register/confirm" in before.json()["error"]
    assert confirmed.status == 200
    assert confirmed.json()["token_type"] == "Bearer"
    assert after.status == 200
    assert _sub(after.json()["token"]) == _sub(confirmed.json()["token"])


def test_email_sign_up_needs_an_email(make_stack):
    h = _email_stack(make_stack)

    response = _post(h, "/register", {"username": "ivan", "password": STRONG})

    assert response.status == 400
    assert response.json()["field"] == "email"


def test_a_stack_without_email_verification_has_no_code_to_confirm(make_stack):
    h = make_stack(endpoints=[])

    response = _post(
        h, "/register/confirm", {"username": "judy", "password": STRONG, "code": "123456"}
    )

    assert response.status == 400
    assert response.json()["field"] == "code"
