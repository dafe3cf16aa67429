"""UserDirectory's answers to what Cognito says, with a stand-in for Cognito: refusals moto
does not produce (an invalid parameter at sign-up, MFA challenges, throttling)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from botocore.exceptions import ClientError

from gpuqueue.auth.account_policy import SignUpVerification
from gpuqueue.auth.user_directory import UserDirectory
from gpuqueue.errors import InvalidConfirmationCode, InvalidCredentials, InvalidInput
from gpuqueue.models import Credentials, Registration, SignUpConfirmation

CREDENTIALS = Credentials(username="user1", password="pass1234word")
REGISTRATION = Registration(username="user1", password="pass1234word")
TOKENS = {"AuthenticationResult": {"AccessToken": "access-token", "ExpiresIn": 3600}}


def _refusal(code: str, message: str = "", operation: str = "SignUp") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


class FakeCognito:
    """Answers each operation with the next scripted answer (a dict, or a ClientError to
    raise) and records the calls."""

    def __init__(self, **answers: list[Any]) -> None:
        self._answers = answers
        self.calls: list[str] = []

    def _answer(self, operation: str) -> Any:
        self.calls.append(operation)
        answer = self._answers[operation].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sign_up(self, **_: Any) -> Any:
        return self._answer("sign_up")

    def admin_confirm_sign_up(self, **_: Any) -> Any:
        return self._answer("admin_confirm_sign_up")

    def initiate_auth(self, **_: Any) -> Any:
        return self._answer("initiate_auth")

    def confirm_sign_up(self, **_: Any) -> Any:
        return self._answer("confirm_sign_up")


def _directory(cognito: FakeCognito) -> UserDirectory:
    return UserDirectory(cast(Any, cognito), user_pool_id="pool", client_id="client")


def test_a_username_cognito_refuses_is_invalid_input_naming_the_username_with_its_reason():
    cognito = FakeCognito(
        sign_up=[_refusal("InvalidParameterException", "Username should be an email.")]
    )

    with pytest.raises(InvalidInput) as refused:
        _directory(cognito).register(REGISTRATION)

    assert refused.value.field == "username"
    assert refused.value.message == "Username should be an email."
    assert cognito.calls == ["sign_up"]  # nothing confirmed, nobody logged in


def test_an_invalid_parameter_without_a_message_still_names_the_username():
    cognito = FakeCognito(sign_up=[_refusal("InvalidParameterException")])

    with pytest.raises(InvalidInput) as refused:
        _directory(cognito).register(REGISTRATION)

    assert (refused.value.field, refused.value.message) == ("username", "invalid username")


@pytest.mark.parametrize(
    "challenge", ["NEW_PASSWORD_REQUIRED", "SMS_MFA", "SOFTWARE_TOKEN_MFA", "MFA_SETUP"]
)
def test_a_login_cognito_answers_with_a_challenge_gives_no_token(challenge):
    cognito = FakeCognito(
        initiate_auth=[{"ChallengeName": challenge, "Session": "s", "ChallengeParameters": {}}]
    )

    with pytest.raises(InvalidCredentials, match="further challenge"):
        _directory(cognito).login(CREDENTIALS)


@pytest.mark.parametrize(
    ("operation", "answers"),
    [
        ("register", {"sign_up": [_refusal("TooManyRequestsException", "Rate exceeded")]}),
        (
            "login",
            {"initiate_auth": [_refusal("InternalErrorException", operation="InitiateAuth")]},
        ),
    ],
    ids=["throttled-sign-up", "cognito-fault-at-login"],
)
def test_a_cognito_fault_stays_a_server_fault_not_a_client_error(operation, answers):
    # Not a 4xx blaming the caller's input: the error goes up as it came (a 5xx).
    cognito = FakeCognito(**answers)

    body = REGISTRATION if operation == "register" else CREDENTIALS

    with pytest.raises(ClientError):
        getattr(_directory(cognito), operation)(body)


def test_an_unconfirmed_account_is_confirmed_once_then_logged_in():
    cognito = FakeCognito(
        initiate_auth=[
            _refusal("UserNotConfirmedException", "User is not confirmed.", "InitiateAuth"),
            TOKENS,
        ],
        admin_confirm_sign_up=[{}],
    )

    token = _directory(cognito).login(CREDENTIALS)

    assert token.token == "access-token"
    assert cognito.calls == ["initiate_auth", "admin_confirm_sign_up", "initiate_auth"]


def test_an_account_still_unconfirmed_after_confirming_is_not_retried_forever():
    not_confirmed = _refusal("UserNotConfirmedException", operation="InitiateAuth")
    cognito = FakeCognito(
        initiate_auth=[not_confirmed, not_confirmed, TOKENS], admin_confirm_sign_up=[{}, {}]
    )

    with pytest.raises(ClientError):
        _directory(cognito).login(CREDENTIALS)
    assert cognito.calls == ["initiate_auth", "admin_confirm_sign_up", "initiate_auth"]


@pytest.mark.parametrize(
    "refusal",
    [
        "CodeMismatchException",
        "ExpiredCodeException",
        "NotAuthorizedException",  # AWS: "User cannot be confirmed. Current status is CONFIRMED"
        "UserNotFoundException",
    ],
)
def test_a_confirmed_or_unknown_user_at_confirm_answers_like_a_wrong_code(refusal):
    # moto confirms any code: these are AWS's refusals. One answer for all of them, so
    # /register/confirm does not tell which names exist either.
    cognito = FakeCognito(confirm_sign_up=[_refusal(refusal, "told", "ConfirmSignUp")])
    directory = UserDirectory(
        cast(Any, cognito),
        user_pool_id="pool",
        client_id="client",
        verification=SignUpVerification.EMAIL,
    )
    confirmation = SignUpConfirmation(username="user1", password="pass1234word", code="123456")

    with pytest.raises(InvalidConfirmationCode) as refused:
        directory.confirm(confirmation)

    assert (refused.value.field, refused.value.message) == (
        "code",
        "code: wrong or expired confirmation code",
    )
    assert cognito.calls == ["confirm_sign_up"]  # nobody logged in
