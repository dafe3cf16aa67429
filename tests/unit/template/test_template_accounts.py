"""The account parameters: Cognito's limits, one value for the pool and the auth function, and a
pool policy no stricter than the function's own check (so the function answers first)."""

from __future__ import annotations

from typing import Any

from gpuqueue.auth.account_policy import PasswordPolicy, SignUpVerification
from gpuqueue.settings import AuthSettings
from gpuqueue_local.template import load_template

TEMPLATE = load_template()
PARAMETERS: dict[str, dict[str, Any]] = TEMPLATE["Parameters"]
RESOURCES: dict[str, dict[str, Any]] = TEMPLATE["Resources"]
POOL = RESOURCES["UserPool"]["Properties"]
AUTH_ENV = RESOURCES["AuthFunction"]["Properties"]["Environment"]["Variables"]


def _bounds(field: str) -> tuple[int, int]:
    metadata = AuthSettings.model_fields[field].metadata
    low = next(m.ge for m in metadata if hasattr(m, "ge"))
    high = next(m.le for m in metadata if hasattr(m, "le"))
    return int(low), int(high)


def test_password_minimum_length_defaults_to_12_within_cognitos_6_to_99() -> None:
    spec = PARAMETERS["PasswordMinimumLength"]

    assert spec["Type"] == "Number"
    assert (int(spec["Default"]), int(spec["MinValue"]), int(spec["MaxValue"])) == (12, 6, 99)
    assert _bounds("password_minimum_length") == (6, 99)
    assert AuthSettings.model_fields["password_minimum_length"].default == 12


def test_the_pool_and_the_auth_function_get_the_same_minimum_length() -> None:
    assert POOL["Policies"]["PasswordPolicy"]["MinimumLength"] == {"Ref": "PasswordMinimumLength"}
    assert AUTH_ENV["PASSWORD_MINIMUM_LENGTH"] == {"Ref": "PasswordMinimumLength"}


def test_the_pool_requires_no_character_class_the_function_does_not_check_first() -> None:
    policy = POOL["Policies"]["PasswordPolicy"]
    checked = PasswordPolicy()

    assert policy["RequireLowercase"] is checked.require_lowercase
    assert policy["RequireNumbers"] is checked.require_digit
    assert policy["RequireUppercase"] is False
    assert policy["RequireSymbols"] is False


def test_sign_up_verification_allows_exactly_what_the_function_understands() -> None:
    spec = PARAMETERS["SignUpVerification"]

    assert spec["AllowedValues"] == [v.value for v in SignUpVerification]
    assert spec["Default"] == SignUpVerification.NONE.value
    assert AUTH_ENV["SIGN_UP_VERIFICATION"] == {"Ref": "SignUpVerification"}


def test_cognito_sends_the_code_by_email_only_when_sign_ups_are_verified_by_email() -> None:
    assert TEMPLATE["Conditions"]["VerifiesSignUpByEmail"] == {
        "Fn::Equals": [{"Ref": "SignUpVerification"}, "email"]
    }
    assert POOL["AutoVerifiedAttributes"] == {
        "Fn::If": ["VerifiesSignUpByEmail", ["email"], {"Ref": "AWS::NoValue"}]
    }
