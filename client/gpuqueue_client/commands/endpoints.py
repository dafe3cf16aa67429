"""Operators: `endpoints list|put|drain|delete`, the GPU endpoints (group admin)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from .invocation import State, friendly_errors, state_of

endpoints_app = typer.Typer(
    help="Operators: list, add or change, drain and delete GPU endpoints (group admin).",
    no_args_is_help=True,
)

ENDPOINT_STATE_STYLES = {"ACTIVE": "green", "DRAINING": "yellow", "DISABLED": "dim"}
CIRCUIT_STYLES = {"CLOSED": "", "HALF_OPEN": "yellow", "OPEN": "red"}
# What `endpoints put` carries over from the current row when an option is not given.
ENDPOINT_SPEC_FIELDS = (
    "url",
    "kind",
    "protocol",
    "capacity",
    "weight",
    "state",
    "credentials",
    "workflow",
    "callback",
    "callback_progress",
)


class Kind(StrEnum):
    image = "image"
    speech = "speech"


class Protocol(StrEnum):
    openai = "openai"
    a1111 = "a1111"
    comfyui = "comfyui"
    cog = "cog"


class EndpointState(StrEnum):
    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    DISABLED = "DISABLED"


EndpointIdArgument = Annotated[str, typer.Argument(metavar="ID", help="The endpoint's id.")]


@endpoints_app.command("list")
def endpoints_list(
    ctx: typer.Context,
    kind: Annotated[Kind | None, typer.Option(help="Only this kind.")] = None,
) -> None:
    """Show every endpoint: state, health, circuit, load and latency."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        rows = client.list_endpoints(kind.value if kind else None)
    if not rows:
        state.out.print("no endpoints")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("url")  # the one column that folds on a narrow terminal
    table.add_column("state", no_wrap=True)
    table.add_column("healthy", no_wrap=True)
    table.add_column("circuit", no_wrap=True)
    table.add_column("in-flight/capacity", no_wrap=True, justify="right")
    table.add_column("latency (EWMA)", no_wrap=True, justify="right")
    for row in rows:
        endpoint_state = str(row.get("state", ""))
        circuit = str(row.get("circuit", ""))
        table.add_row(
            str(row.get("endpoint_id", "")),
            str(row.get("kind", "")),
            Text(str(row.get("url", "")), overflow="fold"),
            Text(endpoint_state, style=ENDPOINT_STATE_STYLES.get(endpoint_state, "")),
            _healthy(row),
            Text(circuit, style=CIRCUIT_STYLES.get(circuit, "")),
            f"{row.get('in_flight', 0)}/{row.get('capacity', '?')}",
            _millis(row.get("latency_ewma_ms")),
        )
    state.out.print(table)


def _healthy(row: dict[str, Any]) -> Text:
    if row.get("healthy") is not True:
        return Text("no", style="red")
    usable = row.get("state") == "ACTIVE" and row.get("circuit") != "OPEN"
    if usable and row.get("routable") is not True:
        return Text("stale", style="yellow")  # healthy at the last check, but it is too old
    return Text("yes", style="green")


def _millis(value: object) -> str:
    return f"{value:.0f} ms" if isinstance(value, int | float) else "-"


def _endpoint_line(row: dict[str, Any]) -> str:
    return (
        f"endpoint {row.get('endpoint_id')}: {row.get('state')}, {row.get('kind')} "
        f"{row.get('url')}, capacity {row.get('capacity')}, weight {row.get('weight')}, "
        f"{_credentials_text(row.get('credentials'))}, "
        f"in flight {row.get('in_flight', 0)} (source {row.get('source')})"
    )


def _credentials_text(credentials: object) -> str:
    """Where the endpoint's key is kept and how it is sent (never the key: the API has none)."""
    if not isinstance(credentials, dict):
        return "no credentials"
    store = (
        f"secret {credentials['secret']}"
        if credentials.get("secret")
        else f"parameter {credentials.get('parameter')}"
    )
    header = credentials.get("header") if credentials.get("type") == "header" else None
    return f"key from {store} as {header or 'Authorization: Bearer'}"


def _credentials(
    state: State,
    current: object,
    *,
    secret: str | None,
    parameter: str | None,
    header: str | None,
    remove: bool,
) -> dict[str, str] | None:
    """The credentials reference to send: the options given, else the current one."""
    if remove and (secret or parameter or header):
        state.fail("error: --no-credentials goes alone, without --credentials-* options")
    if secret and parameter:
        state.fail("error: give --credentials-secret or --credentials-parameter, not both")
    if remove:
        return None
    kept = {k: v for k, v in current.items() if v is not None} if isinstance(current, dict) else {}
    if secret or parameter:
        kept = {"secret": secret} if secret else {"parameter": str(parameter)}
    elif header and not kept:
        state.fail(
            "error: --credentials-header needs --credentials-secret or --credentials-parameter"
        )
    if not kept:
        return None
    chosen = header or (kept.get("header") if (secret or parameter) is None else None)
    store = {k: v for k, v in kept.items() if k in ("secret", "parameter")}
    return {"type": "header", "header": chosen, **store} if chosen else {"type": "bearer", **store}


def _workflow(
    state: State, current: object, *, path: Path | None, checkpoint: str | None, protocol: object
) -> object:
    """The comfyui workflow to send: the file's, the checkpoint's default graph, else the
    current one (none once the endpoint speaks another protocol)."""
    if path is not None and checkpoint is not None:
        state.fail("error: give --workflow or --checkpoint, not both")
    if checkpoint is not None:
        return {"checkpoint": checkpoint}
    if path is not None:
        try:
            loaded: object = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            state.fail(f"error: --workflow {path}: {error}")
        if not isinstance(loaded, dict):
            state.fail(f"error: --workflow {path}: a JSON object of graph and node ids")
        return loaded
    return current if protocol == Protocol.comfyui.value else None


@endpoints_app.command("put")
def endpoints_put(
    ctx: typer.Context,
    endpoint_id: EndpointIdArgument,
    *,
    url: Annotated[
        str | None, typer.Option(help="Base URL, http(s)://host\\[:port]\\[/path].")
    ] = None,
    kind: Annotated[Kind | None, typer.Option(help="What it serves.")] = None,
    protocol: Annotated[Protocol | None, typer.Option(help="Its API.")] = None,
    capacity: Annotated[
        int | None, typer.Option(help="Concurrent calls it takes (1-64).", min=1, max=64)
    ] = None,
    weight: Annotated[
        int | None,
        typer.Option(help="Share of work under weighted dispatch (1-100).", min=1, max=100),
    ] = None,
    endpoint_state: Annotated[
        EndpointState | None,
        typer.Option("--state", case_sensitive=False, help="ACTIVE, DRAINING or DISABLED."),
    ] = None,
    credentials_secret: Annotated[
        str | None,
        typer.Option(help="Secrets Manager secret holding its API key (<stack>/gpu/...)."),
    ] = None,
    credentials_parameter: Annotated[
        str | None,
        typer.Option(help="SSM SecureString parameter holding its API key (/<stack>/gpu/...)."),
    ] = None,
    credentials_header: Annotated[
        str | None,
        typer.Option(help="Send the key in this header (e.g. X-Api-Key), not as a bearer token."),
    ] = None,
    no_credentials: Annotated[
        bool, typer.Option("--no-credentials", help="Call it without a key.")
    ] = False,
    workflow: Annotated[
        Path | None,
        typer.Option(
            help="comfyui: a JSON file with the API-format graph ('graph', as ComfyUI's "
            "'Save (API)' exports it) and the node ids: prompt_node, negative_node, seed_node, "
            "seed_input, size_node, steps_node, output_node.",
        ),
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(help="comfyui: run ComfyUI's default txt2img graph with this checkpoint."),
    ] = None,
    callback: Annotated[
        bool | None,
        typer.Option(
            "--callback/--no-callback",
            help="Cog only: start predictions with a webhook; no Lambda waits on the GPU.",
        ),
    ] = None,
    callback_progress: Annotated[
        bool | None,
        typer.Option(
            "--callback-progress/--no-callback-progress",
            help="Callback mode: also take Cog's logs webhooks (progress, a cancel within "
            "seconds); --no-callback-progress: the completed webhook only, the cheapest.",
        ),
    ] = None,
) -> None:
    """Add an endpoint (--url and --kind needed), or change the options given.

    Options not given keep the endpoint's current values (the API's defaults when new).
    The key itself never goes through the API: store it in the secret or parameter named.
    """
    state = state_of(ctx)
    client = state.client()
    given: dict[str, Any] = {
        "url": url,
        "kind": kind.value if kind else None,
        "protocol": protocol.value if protocol else None,
        "capacity": capacity,
        "weight": weight,
        "state": endpoint_state.value if endpoint_state else None,
        "callback": callback,
        "callback_progress": callback_progress,
    }
    with friendly_errors(state):
        current = next(
            (r for r in client.list_endpoints() if r.get("endpoint_id") == endpoint_id), None
        )
        spec = {
            name: given[name] if given.get(name) is not None else (current or {}).get(name)
            for name in ENDPOINT_SPEC_FIELDS
        }
        if current is None and (spec["url"] is None or spec["kind"] is None):
            state.fail(f"error: endpoint {endpoint_id} is new: --url and --kind are needed")
        spec["credentials"] = _credentials(
            state,
            spec["credentials"],
            secret=credentials_secret,
            parameter=credentials_parameter,
            header=credentials_header,
            remove=no_credentials,
        )
        spec["workflow"] = _workflow(
            state,
            spec["workflow"],
            path=workflow,
            checkpoint=checkpoint,
            protocol=spec["protocol"],
        )
        row = client.put_endpoint(endpoint_id, **spec)
    verb = "added" if current is None else "changed"
    state.out.print(f"{verb} {_endpoint_line(row)}", soft_wrap=True)


@endpoints_app.command("drain")
def endpoints_drain(ctx: typer.Context, endpoint_id: EndpointIdArgument) -> None:
    """Send the endpoint no new work; calls already running finish."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        row = client.drain_endpoint(endpoint_id)
    state.out.print(_endpoint_line(row), soft_wrap=True)


@endpoints_app.command("delete")
def endpoints_delete(ctx: typer.Context, endpoint_id: EndpointIdArgument) -> None:
    """Remove an endpoint added here (declared ones: --state DISABLED, or the stack parameter)."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        client.delete_endpoint(endpoint_id)
    state.out.print(f"endpoint {endpoint_id} deleted", soft_wrap=True)
