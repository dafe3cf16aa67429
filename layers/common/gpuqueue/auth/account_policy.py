"""What an account may be called and which passwords it may have.

Usernames are normalized (NFKC, case-folded) before anything sees them, so `Alice` and its
fullwidth form (U+FF41...) are one account; a new name must then be plain ASCII, which
refuses look-alikes from other scripts (Cyrillic U+0430 for `a`), zero-width joiners and
the like.

Passwords are checked here before Cognito: the pool's own policy has no deny-list and no
rule against the username, and checking its length and classes here too means every weak
password gets our answer, whether or not the name is taken (Cognito might check existence
first, which would tell which names exist).
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources

from gpuqueue.errors import WeakPassword

USERNAME_MIN_LENGTH = 3
USERNAME_MAX_LENGTH = 64
# A new name: lower-case ASCII letters, digits, '.', '_' and '-', starting with a letter or digit.
NEW_USERNAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
NEW_USERNAME_RULE = (
    "use only a-z, 0-9, '.', '_' and '-', starting with a letter or digit "
    "(letters from other scripts and invisible characters are refused)"
)
# 20,000 common passwords (Royce Williams's list, lower-cased, as Django ships it, BSD-3).
COMMON_PASSWORDS_FILE = "common-passwords.txt.gz"
DEFAULT_PASSWORD_MINIMUM_LENGTH = 12


class SignUpVerification(StrEnum):
    """The SignUpVerification parameter: `none` confirms a sign-up at once and signs the user
    in; `email` leaves it to the code Cognito e-mails (POST /register/confirm)."""

    NONE = "none"
    EMAIL = "email"


def fold(text: str) -> str:
    """NFKC and case-folded (and NFKC again: folding can leave a non-NFKC string)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def normalize_username(value: object) -> object:
    """A pydantic before-validator: strings are trimmed and folded; anything else is left to
    the str schema to refuse."""
    return fold(value.strip()) if isinstance(value, str) else value


def check_new_username(value: str) -> str:
    if not NEW_USERNAME_PATTERN.fullmatch(value):
        raise ValueError(NEW_USERNAME_RULE)
    return value


@cache
def common_passwords() -> frozenset[str]:
    """Read once per container from the file shipped in the layer (no download)."""
    data = resources.files("gpuqueue.auth").joinpath(COMMON_PASSWORDS_FILE).read_bytes()
    return frozenset(line.strip() for line in gzip.decompress(data).decode().splitlines())


@dataclass(frozen=True, kw_only=True)
class PasswordPolicy:
    """The stack's policy. `minimum_length` is the PasswordMinimumLength parameter, which the
    Cognito pool enforces too; the classes mirror the pool's RequireLowercase/RequireNumbers."""

    minimum_length: int = DEFAULT_PASSWORD_MINIMUM_LENGTH
    require_lowercase: bool = True
    require_digit: bool = True

    def check(self, *, username: str, password: str) -> None:
        """Raise WeakPassword (naming `password`) saying which rule the password breaks."""
        folded = fold(password)
        if len(password) < self.minimum_length:
            self._refuse(f"password must be at least {self.minimum_length} characters long")
        if fold(username) in folded:
            self._refuse("password must not contain the username")
        if folded in common_passwords():
            self._refuse("password is one of the most common passwords: choose another")
        if self.require_lowercase and not re.search(r"[a-z]", password):
            self._refuse("password must contain a lower-case letter")
        if self.require_digit and not re.search(r"[0-9]", password):
            self._refuse("password must contain a digit")

    @staticmethod
    def _refuse(message: str) -> None:
        raise WeakPassword(message, field="password")
