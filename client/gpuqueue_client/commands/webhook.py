"""Webhook receivers: `webhook verify` a delivery's signature, `webhook sign` a body to test
one."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from .. import webhooks
from .invocation import state_of

webhook_app = typer.Typer(
    help="Webhook receivers: check a delivery's signature, or sign a body to test one.",
    no_args_is_help=True,
)

SecretOption = Annotated[
    list[str],
    typer.Option(
        "--secret",
        metavar="SECRET",
        envvar="GPUQUEUE_WEBHOOK_SECRET",
        help="The webhook secret; give it twice during a rotation (new and old; in the "
        "variable: separated by spaces).",
        show_default=False,
    ),
]
BodyFileOption = Annotated[
    typer.FileBinaryRead,
    typer.Option(
        "--body-file",
        metavar="FILE",
        help="The raw request body, byte for byte; - reads standard input.",
        show_default=False,
    ),
]


def _webhook_secrets(secrets: list[str]) -> list[str]:
    if not secrets or not all(secrets):
        raise typer.BadParameter("a webhook secret must not be empty", param_hint="'--secret'")
    return secrets


@webhook_app.command("verify")
def webhook_verify(
    ctx: typer.Context,
    secret: SecretOption,
    signature: Annotated[
        str,
        typer.Option(
            "--signature",
            help="The X-Gpuqueue-Signature header's value (t=...,v1=...).",
            show_default=False,
        ),
    ],
    body_file: BodyFileOption,
    tolerance: Annotated[
        int, typer.Option(help="Refuse a timestamp more than this many seconds from now.", min=0)
    ] = webhooks.DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Check a delivery: print `valid` (exit 0), or why it must be refused (exit 1)."""
    state = state_of(ctx)
    secrets = _webhook_secrets(secret)
    name, colon, value = signature.partition(":")
    header = value if colon and name.strip().lower() == "x-gpuqueue-signature" else signature
    try:
        webhooks.verify_or_raise(
            secrets, header.strip(), body_file.read(), tolerance_seconds=tolerance
        )
    except webhooks.WebhookVerificationError as exc:
        state.fail(f"invalid: {exc.reason}")
    state.out.print("valid")


@webhook_app.command("sign")
def webhook_sign(
    ctx: typer.Context,
    secret: SecretOption,
    body_file: BodyFileOption,
    timestamp: Annotated[
        int | None,
        typer.Option(help="The t= to sign with (unix seconds).", show_default="now", min=0),
    ] = None,
) -> None:
    """Print the X-Gpuqueue-Signature value for a body, to test a receiver (with curl)."""
    state = state_of(ctx)
    secrets = _webhook_secrets(secret)
    when = int(time.time()) if timestamp is None else timestamp
    state.out.print(webhooks.sign(secrets, body_file.read(), timestamp=when), soft_wrap=True)
