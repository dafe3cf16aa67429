"""Deploying as the README says: `make deploy` and the guided first deploy read (and write)
the repository's samconfig.toml. Left to itself, sam looks for it beside the template it
deploys, .aws-sam/build/, where there is none and where `make build` would wipe what
`--guided` saved."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SAMCONFIG = ROOT / "samconfig.toml"
BUILT_TEMPLATE = ".aws-sam/build/template.yaml"


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _make_deploy(*variables: str) -> list[str]:
    """The sam command `make deploy` would run (make -n: printed, nothing run)."""
    printed = subprocess.run(
        ["make", "-C", str(ROOT), "-n", "deploy", *variables],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [line] = [line for line in printed.splitlines() if re.search(r"\bsam deploy\b", line)]
    return shlex.split(line)


@pytest.mark.parametrize("environment", ["default", "dev", "prod"])
def test_make_deploy_reads_the_repositorys_samconfig_for_the_environment_asked(
    environment: str,
) -> None:
    argv = _make_deploy(f"ENV={environment}")

    assert Path(_option(argv, "--config-file")) == SAMCONFIG
    assert Path(_option(argv, "--config-file")).is_absolute()  # whatever sam's working folder
    assert _option(argv, "--config-env") == environment
    assert _option(argv, "--template-file") == BUILT_TEMPLATE
    config = tomllib.loads(SAMCONFIG.read_text())
    assert config[environment]["global"]["parameters"]["stack_name"]
    assert "capabilities" in config[environment]["deploy"]["parameters"]


def test_make_deploy_without_env_uses_the_default_environment() -> None:
    assert _option(_make_deploy(), "--config-env") == "default"


def test_make_deploy_builds_first() -> None:
    printed = subprocess.run(
        ["make", "-C", str(ROOT), "-n", "deploy"], capture_output=True, text=True, check=True
    ).stdout

    assert "tools/build_artifacts.py" in printed
    assert printed.index("tools/build_artifacts.py") < printed.index("sam deploy")


def test_the_readmes_guided_deploy_saves_its_answers_in_the_repositorys_samconfig() -> None:
    readme = (ROOT / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if "sam deploy --guided" in line]
    # Run from the repository's root, as the README says: $PWD is the root.
    argv = shlex.split(line.split("#", 1)[0].replace("$PWD", str(ROOT)))

    assert Path(_option(argv, "--config-file")) == SAMCONFIG
    assert _option(argv, "--template-file") == BUILT_TEMPLATE
    assert _option(argv, "--config-env") in tomllib.loads(SAMCONFIG.read_text())
