"""Accounts: `register`, `confirm` (an e-mailed sign-up code), `login`, `logout`."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import credentials
from .invocation import State, friendly_errors, state_of

UsernameOption = Annotated[str, typer.Option("--username", "-u", prompt=True)]


def _authenticate(state: State, username: str, token: str, expires_at: float | None) -> None:
    path = credentials.save(state.api_url, token, username, expires_at)
    state.err.print(f"token cached in {path}", style="dim", soft_wrap=True)


def register(
    ctx: typer.Context,
    username: UsernameOption,
    password: Annotated[
        str,
        typer.Option("--password", "-p", prompt=True, hide_input=True, confirmation_prompt=True),
    ],
    email: Annotated[
        str | None,
        typer.Option("--email", help="Where the code goes, on a stack that verifies sign-ups."),
    ] = None,
) -> None:
    """Create a user and log in as it (or, where sign-ups are verified by e-mail, have a code
    sent for `confirm`)."""
    state = state_of(ctx)
    client = state.anonymous_client()
    with friendly_errors(state, logging_in=True):
        token = client.register(username, password, email=email)
    if token is None:
        state.out.print(
            "if the name was free, a code is on its way by e-mail: "
            f"gpuqueue confirm -u {username} --code CODE",
            soft_wrap=True,
        )
        return
    _authenticate(state, username, token, client.expires_at)
    state.out.print(f"registered; logged in as {username}", soft_wrap=True)


def confirm(
    ctx: typer.Context,
    username: UsernameOption,
    password: Annotated[str, typer.Option("--password", "-p", prompt=True, hide_input=True)],
    code: Annotated[str, typer.Option("--code", prompt=True, help="The code from the e-mail.")],
) -> None:
    """Confirm an e-mailed sign-up code and log in."""
    state = state_of(ctx)
    client = state.anonymous_client()
    with friendly_errors(state, logging_in=True):
        token = client.confirm_registration(username, password, code)
    _authenticate(state, username, token, client.expires_at)
    state.out.print(f"confirmed; logged in as {username}", soft_wrap=True)


def login(
    ctx: typer.Context,
    username: UsernameOption,
    password: Annotated[str, typer.Option("--password", "-p", prompt=True, hide_input=True)],
) -> None:
    """Log in and cache the token for --api-url."""
    state = state_of(ctx)
    client = state.anonymous_client()
    with friendly_errors(state, logging_in=True):
        token = client.login(username, password)
    _authenticate(state, username, token, client.expires_at)
    state.out.print(f"logged in as {username}", soft_wrap=True)


def logout(ctx: typer.Context) -> None:
    """Forget the cached token for --api-url."""
    state = state_of(ctx)
    forgotten = credentials.delete(state.api_url)
    state.out.print("logged out" if forgotten else "not logged in")
