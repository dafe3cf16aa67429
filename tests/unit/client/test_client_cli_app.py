"""The `gpuqueue` app as `cli.py` assembles it from the command groups in `commands/`: every
command listed in `--help`, in the order a user reads them, each group with its own commands."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

CLIENT_DIR = Path(__file__).resolve().parents[3] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client import credentials  # noqa: E402
from gpuqueue_client.cli import app  # noqa: E402


def listed_commands(*args: str) -> list[str]:
    """The command names of a `--help` screen's Commands panel, top to bottom."""
    done = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert done.exit_code == 0, done.output
    panel = done.output.split("Commands", 1)[1]
    return re.findall(r"^│ (\S+) {2,}\S", panel, flags=re.MULTILINE)


def test_help_lists_every_command_and_group_in_reading_order() -> None:
    assert listed_commands() == [
        "register",
        "confirm",
        "login",
        "logout",
        "generate",
        "tasks",
        "task",
        "cancel",
        "stats",
        "transcribe",
        "transcript",
        "endpoints",
        "webhook",
    ]


@pytest.mark.parametrize(
    ("group", "commands"),
    [
        ("endpoints", ["list", "put", "drain", "delete"]),
        ("webhook", ["verify", "sign"]),
    ],
)
def test_each_group_lists_its_own_commands(group: str, commands: list[str]) -> None:
    assert listed_commands(group) == commands


def test_a_grouped_command_gets_the_global_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app's callback turns --api-url into the state `logout` reads (its trailing / cut).
    monkeypatch.setenv("GPUQUEUE_CONFIG_DIR", str(tmp_path))
    credentials.save("http://127.0.0.1:9", "a-token", "alice", None)
    env = {"GPUQUEUE_API_URL": None, "GPUQUEUE_TOKEN": None}

    runner = CliRunner()
    first = runner.invoke(app, ["--api-url", "http://127.0.0.1:9/", "logout"], env=env)
    second = runner.invoke(app, ["--api-url", "http://127.0.0.1:9/", "logout"], env=env)

    assert (first.exit_code, first.output.strip()) == (0, "logged out")
    assert (second.exit_code, second.output.strip()) == (0, "not logged in")


@pytest.mark.parametrize(
    "command",
    [
        *[[name] for name in ("register", "login", "generate", "tasks", "transcribe")],
        *[["endpoints", name] for name in ("list", "put", "drain", "delete")],
        *[["webhook", name] for name in ("verify", "sign")],
    ],
)
def test_every_command_shows_its_help(command: list[str]) -> None:
    # `endpoints put --help` crashed: its --url help's "[:port]" read as rich markup.
    done = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert done.exit_code == 0, done.output
    assert "Usage:" in done.output
    if command == ["endpoints", "put"]:
        assert "http(s)://host[:port][/path]" in done.output
