"""`gpuqueue`: register, log in, submit, wait for and download images, transcribe speech;
operators: endpoints; webhook receivers: verify and sign deliveries.

This module builds the app: its global options and the commands, in the order `--help` lists
them; each group's commands live in `commands/`."""

from __future__ import annotations

from typing import Annotated

import typer

from .commands import account, speech, tasks
from .commands.endpoints import endpoints_app
from .commands.invocation import State
from .commands.webhook import webhook_app

DEFAULT_API_URL = "http://127.0.0.1:3000"

app = typer.Typer(
    name="gpuqueue",
    help="Submit image and speech tasks to a gpuqueue API and fetch the results.",
    no_args_is_help=True,
    add_completion=False,
    # Never print locals on a crash: they hold passwords and tokens.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main(
    ctx: typer.Context,
    api_url: Annotated[
        str, typer.Option("--api-url", envvar="GPUQUEUE_API_URL", help="The API's base URL.")
    ] = DEFAULT_API_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="GPUQUEUE_TOKEN",
            help="A bearer token (default: the one `gpuqueue login` cached for --api-url).",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = State(api_url=api_url.rstrip("/"), token=token or None)


for command in (
    account.register,
    account.confirm,
    account.login,
    account.logout,
    tasks.generate,
    tasks.tasks,
    tasks.task,
    tasks.cancel,
    tasks.stats,
    speech.transcribe,
    speech.transcript,
):
    app.command()(command)
app.add_typer(endpoints_app, name="endpoints")
app.add_typer(webhook_app, name="webhook")


def main() -> None:
    """The `gpuqueue` console script."""
    app(prog_name="gpuqueue")
