"""UserDirectory: register and log in against the Cognito user pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from gpuqueue.errors import InvalidCredentials, InvalidInput, UserAlreadyExists, WeakPassword
from gpuqueue.models import Credentials, TokenResponse

if TYPE_CHECKING:
    from mypy_boto3_cognito_idp import CognitoIdentityProviderClient
    from mypy_boto3_cognito_idp.type_defs import InitiateAuthResponseTypeDef


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", "")).strip()


class UserDirectory:
    def __init__(
        self, cognito: CognitoIdentityProviderClient, *, user_pool_id: str, client_id: str
    ) -> None:
        self._cognito = cognito
        self._pool = user_pool_id
        self._client = client_id

    def register(self, credentials: Credentials) -> TokenResponse:
        try:
            self._cognito.sign_up(
                ClientId=self._client,
                Username=credentials.username,
                Password=credentials.password,
            )
        except ClientError as error:
            code = _code(error)
            if code == "UsernameExistsException":
                raise UserAlreadyExists(
                    f"user {credentials.username!r} already exists", field="username"
                ) from None
            if code == "InvalidPasswordException":
                raise WeakPassword(
                    _message(error) or "password does not meet the policy", field="password"
                ) from None
            if code == "InvalidParameterException":
                raise InvalidInput(
                    _message(error) or "invalid username", field="username"
                ) from None
            raise
        # The API has no e-mail step: the stack confirms the account itself.
        self._cognito.admin_confirm_sign_up(UserPoolId=self._pool, Username=credentials.username)
        return self.login(credentials)

    def login(self, credentials: Credentials) -> TokenResponse:
        try:
            result = self._initiate_auth(credentials)
        except ClientError as error:
            if _code(error) != "UserNotConfirmedException":
                raise
            # A register that stopped between sign-up and confirmation: the API has no e-mail
            # step, the stack confirms every account itself, so it does so now. Cognito checks
            # the password first: a wrong one is a NotAuthorizedException and confirms nothing.
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
