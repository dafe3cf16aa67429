"""Make moto's Cognito accept the passwords Cognito accepts: up to 256 characters.

moto checks a password against `MaximumLength` (99 unless the pool says otherwise, a key
Cognito's API does not have) with `len < MaximumLength`, so it refuses every password of 99
characters or more; Cognito takes up to 256. The local stack would then refuse a password a
deployed stack accepts (the smoke test's, which must meet `PasswordMinimumLength` up to 99).
The check runs against a copy of the pool's policy that carries Cognito's real maximum.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from moto.cognitoidp.models import CognitoIdpBackend

COGNITO_MAXIMUM_PASSWORD_LENGTH = 256
_MARK = "_gpuqueue_password_length"


def _with_cognitos_maximum(method: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(method)
    def validate(self: CognitoIdpBackend, user_pool_id: str, password: str) -> None:
        pool = self.describe_user_pool(user_pool_id)
        original = pool.extended_config
        policies = copy.deepcopy(original.get("Policies", {}))
        policies.setdefault("PasswordPolicy", {})["MaximumLength"] = (
            COGNITO_MAXIMUM_PASSWORD_LENGTH + 1  # moto's check is `len < MaximumLength`
        )
        pool.extended_config = {**original, "Policies": policies}
        try:
            method(self, user_pool_id, password)
        finally:
            pool.extended_config = original

    setattr(validate, _MARK, True)
    return validate


def install() -> None:
    """Patch moto's password check (idempotent)."""
    current: Any = CognitoIdpBackend._validate_password
    if not getattr(current, _MARK, False):
        CognitoIdpBackend._validate_password = _with_cognitos_maximum(current)  # type: ignore[method-assign]
