"""UserDirectory: register, confirm and log in against the Cognito user pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from gpuqueue.auth.account_policy import PasswordPolicy, SignUpVerification
from gpuqueue.errors import (
    AccountNotConfirmed,
    InvalidConfirmationCode,
    InvalidCredentials,
    InvalidInput,
    UserAlreadyExists,
    WeakPassword,
)
from gpuqueue.models import (
    Credentials,
    Registration,
    SignUpConfirmation,
    SignUpPending,
    TokenResponse,
)

if TYPE_CHECKING:
    from mypy_boto3_cognito_idp import CognitoIdentityProviderClient
    from mypy_boto3_cognito_idp.type_defs import (
        AttributeTypeTypeDef,
        InitiateAuthResponseTypeDef,
    )


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", "")).strip()


class UserDirectory:
    def __init__(
        self,
        cognito: CognitoIdentityProviderClient,
        *,
        user_pool_id: str,
        client_id: str,
        password_policy: PasswordPolicy | None = None,
        verification: SignUpVerification = SignUpVerification.NONE,
    ) -> None:
        self._cognito = cognito
        self._pool = user_pool_id
        self._client = client_id
        self._policy = password_policy or PasswordPolicy()
        self._verification = verification

    def register(self, registration: Registration) -> TokenResponse | SignUpPending:
        """`none`: confirmed and signed in at once (so a taken name has to be a 409).
        `email`: Cognito e-mails a code; the answer is the same whether the name was free."""
        self._policy.check(username=registration.username, password=registration.password)
        by_email = self._verification is SignUpVerification.EMAIL
        if by_email and registration.email is None:
            raise InvalidInput(
                "email: this stack confirms sign-ups with a code sent by e-mail", field="email"
            )
        attributes: list[AttributeTypeTypeDef] = []
        if by_email and registration.email:
            attributes.append({"Name": "email", "Value": registration.email})
        try:
            self._cognito.sign_up(
                ClientId=self._client,
                Username=registration.username,
                Password=registration.password,
                UserAttributes=attributes,
            )
        except ClientError as error:
            code = _code(error)
            if code == "UsernameExistsException":
                if by_email:
                    return SignUpPending()
                raise UserAlreadyExists("username is taken", field="username") from None
            if code == "InvalidPasswordException":
                raise WeakPassword(
                    _message(error) or "password does not meet the policy", field="password"
                ) from None
            if code == "InvalidParameterException":
                raise InvalidInput(
                    _message(error) or "invalid username", field="username"
                ) from None
            raise
        if by_email:
            return SignUpPending()
        # No e-mail step: the stack confirms the account itself.
        self._cognito.admin_confirm_sign_up(UserPoolId=self._pool, Username=registration.username)
        return self.login(registration.credentials())

    def confirm(self, confirmation: SignUpConfirmation) -> TokenResponse:
        """The e-mailed code confirms the account; the password then signs it in."""
        if self._verification is not SignUpVerification.EMAIL:
            raise InvalidInput(
                "code: this stack confirms accounts at sign-up, there is no code to confirm",
                field="code",
            )
        try:
            self._cognito.confirm_sign_up(
                ClientId=self._client,
                Username=confirmation.username,
                ConfirmationCode=confirmation.code,
            )
        except ClientError as error:
            # A confirmed or unknown user answers like a wrong code: no enumeration here either.
            if _code(error) in {
                "CodeMismatchException",
                "ExpiredCodeException",
                "NotAuthorizedException",
                "UserNotFoundException",
                "TooManyFailedAttemptsException",
            }:
                raise InvalidConfirmationCode(
                    "code: wrong or expired confirmation code", field="code"
                ) from None
            raise
        return self.login(confirmation.credentials())

    def login(self, credentials: Credentials) -> TokenResponse:
        try:
            result = self._initiate_auth(credentials)
        except ClientError as error:
            if _code(error) != "UserNotConfirmedException":
                raise
            # Cognito checks the password first: a wrong one is a NotAuthorizedException, so
            # only the account's owner gets here.
            if self._verification is SignUpVerification.EMAIL:
                raise AccountNotConfirmed(
                    "confirm the account first: POST /register/confirm with the code sent by e-mail"
                ) from None
            # A register that stopped between sign-up and confirmation: the stack confirms
            # every account itself, so it does so now.
            self._cognito.admin_confirm_sign_up(
                UserPoolId=self._pool, Username=credentials.username
            )
            result = self._initiate_auth(credentials)
        auth = result.get("AuthenticationResult")
        if not auth or "AccessToken" not in auth:
            raise InvalidCredentials("login needs a further challenge this API does not support")
        # The access token: it carries the scope the API's JWT authorizer requires.
        return TokenResponse(token=auth["AccessToken"], expires_in=int(auth.get("ExpiresIn", 3600)))

    def _initiate_auth(self, credentials: Credentials) -> InitiateAuthResponseTypeDef:
        try:
            return self._cognito.initiate_auth(
                ClientId=self._client,
                AuthFlow="USER_PASSWORD_AUTH",
                AuthParameters={
                    "USERNAME": credentials.username,
                    "PASSWORD": credentials.password,
                },
            )
        except ClientError as error:
            # Same answer for unknown user and wrong password: no account enumeration.
            if _code(error) in {"NotAuthorizedException", "UserNotFoundException"}:
                raise InvalidCredentials("invalid username or password") from None
            raise
