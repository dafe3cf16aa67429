"""tools/build_artifacts.py on the real template, with --skip-deps (no network, no pip)."""

from __future__ import annotations

import contextlib
import io
import json
import marshal
import sys
from pathlib import Path
from typing import Any

import pytest

import build_artifacts  # tools/ is on the test path (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "template.yaml"


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == kind
    }


@pytest.fixture(scope="module")
def source_template() -> dict[str, Any]:
    loaded: dict[str, Any] = build_artifacts.load_template(TEMPLATE)
    return loaded


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    build_dir = tmp_path_factory.mktemp("sam") / "build"
    (build_dir / "stale").mkdir(parents=True)  # the build must start from an empty dir
    argv = ["--template", str(TEMPLATE), "--build-dir", str(build_dir), "--skip-deps"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert build_artifacts.main(argv) == 0
    output = json.loads((build_dir / "template.yaml").read_text(encoding="utf-8"))
    return build_dir, output, printed.getvalue()


def test_every_function_has_its_dir_with_its_handler_module(
    built: tuple[Path, dict[str, Any], str], source_template: dict[str, Any]
) -> None:
    build_dir, _output, _printed = built
    functions = _resources(source_template, "AWS::Serverless::Function")
    assert len(functions) >= 6
    for logical_id, resource in functions.items():
        module = resource["Properties"]["Handler"].rsplit(".", 1)[0]
        assert (build_dir / logical_id / f"{module}.py").is_file(), logical_id


def test_build_leaves_out_this_machines_bytecode_and_caches(
    built: tuple[Path, dict[str, Any], str],
) -> None:
    build_dir, _output, _printed = built
    # Only the runtime's own bytecode (python3.12), where that interpreter is here to make it.
    assert all(p.name.endswith(".cpython-312.pyc") for p in build_dir.rglob("*.pyc"))
    assert not list(build_dir.rglob(".pytest_cache"))
    assert not (build_dir / "stale").exists()


def test_every_module_ships_compiled_for_where_lambda_puts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This interpreter stands in for the runtime's: what is checked is what gets compiled, how,
    # and under which path (Lambda's code is read-only: a module without its .pyc is compiled
    # again on every cold start).
    monkeypatch.setattr(build_artifacts, "runtime_python", lambda version: Path(sys.executable))
    build_artifacts.build(TEMPLATE, tmp_path / "build", skip_deps=True)
    tag = sys.implementation.cache_tag
    for root, prefix in (
        (tmp_path / "build" / "TasksFunction", "/var/task/"),
        (tmp_path / "build" / "CommonLayer" / "python", "/opt/python/"),
    ):
        sources = list(root.rglob("*.py"))
        assert sources
        for source in sources:
            compiled = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
            data = compiled.read_bytes()
            # PEP 552: flags 0b01 = hash-based, not checked against the source (no timestamp).
            assert int.from_bytes(data[4:8], "little") == 1, compiled
            code = marshal.loads(data[16:])  # noqa: S302 (our own build output)
            assert code.co_filename == prefix + str(source.relative_to(root)), compiled


def _interpreter(path: Path, prints: str, exit_code: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {prints}\nexit {exit_code}\n")
    path.chmod(0o755)
    return path


def test_the_runtimes_python_is_found_past_a_shim_that_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shim = _interpreter(tmp_path / "shims" / "python3.12", "not-selected", exit_code=127)
    older = _interpreter(tmp_path / "pyenv" / "versions" / "3.12.1" / "bin" / "python3.12", "3.12")
    newer = _interpreter(tmp_path / "pyenv" / "versions" / "3.12.10" / "bin" / "python3.12", "3.12")
    _interpreter(tmp_path / "pyenv" / "versions" / "3.11.7" / "bin" / "python3.11", "3.11")
    monkeypatch.setenv("PATH", str(shim.parent))
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    assert build_artifacts.runtime_python("3.12") == newer
    newer.unlink()
    assert build_artifacts.runtime_python("3.12") == older
    assert build_artifacts.runtime_python("3.13") is None


def test_layer_holds_the_package_under_python(
    built: tuple[Path, dict[str, Any], str], source_template: dict[str, Any]
) -> None:
    build_dir, _output, _printed = built
    assert "CommonLayer" in _resources(source_template, "AWS::Serverless::LayerVersion")
    site = build_dir / "CommonLayer" / "python"
    assert (site / "gpuqueue" / "__init__.py").is_file()
    assert not (site / "requirements.txt").exists()


def test_output_template_points_at_the_built_dirs(
    built: tuple[Path, dict[str, Any], str], source_template: dict[str, Any]
) -> None:
    build_dir, output, _printed = built
    functions = _resources(output, "AWS::Serverless::Function")
    layers = _resources(output, "AWS::Serverless::LayerVersion")
    assert functions.keys() == _resources(source_template, "AWS::Serverless::Function").keys()
    for logical_id, resource in functions.items():
        code_uri = resource["Properties"]["CodeUri"]
        assert code_uri == logical_id
        assert (build_dir / code_uri).is_dir()
    for logical_id, resource in layers.items():
        content_uri = resource["Properties"]["ContentUri"]
        assert content_uri == logical_id
        assert (build_dir / content_uri / "python").is_dir()
        # Built already: no build metadata left for sam to act on.
        assert "BuildMethod" not in resource.get("Metadata", {})


def test_output_template_keeps_intrinsics(built: tuple[Path, dict[str, Any], str]) -> None:
    _build_dir, output, _printed = built
    assert output["Transform"] == "AWS::Serverless-2016-10-31"
    assert output["Globals"]["Function"]["Layers"] == [{"Ref": "CommonLayer"}]
    assert output["Globals"]["Function"]["Runtime"] == "python3.12"
    metrics_ns = output["Globals"]["Function"]["Environment"]["Variables"][
        "POWERTOOLS_METRICS_NAMESPACE"
    ]
    assert metrics_ns == {"Fn::Sub": "gpuqueue/${AWS::StackName}"}
    redrive = output["Resources"]["TaskQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["TaskDeadLetterQueue", "Arn"]}
    assert output["Parameters"]["QueueCapacity"]["Default"] == 100


def test_prints_one_line_per_artifact_and_a_total(
    built: tuple[Path, dict[str, Any], str], source_template: dict[str, Any]
) -> None:
    _build_dir, _output, printed = built
    ids = [*_resources(source_template, "AWS::Serverless::Function"), "CommonLayer"]
    for logical_id in ids:
        assert f" {logical_id} " in printed
    assert "total" in printed
    assert " MB" in printed


def test_target_maps_runtime_and_architecture() -> None:
    target = build_artifacts.Target("python3.12", "arm64")
    assert target.platform == "manylinux2014_aarch64"
    assert target.python_version == "3.12"
    assert build_artifacts.Target("python3.11", "x86_64").platform == "manylinux2014_x86_64"
    with pytest.raises(build_artifacts.BuildError):
        build_artifacts.Target("nodejs20.x", "arm64").validated()
    with pytest.raises(build_artifacts.BuildError):
        build_artifacts.Target("python3.12", "sparc").validated()


def test_pip_failure_is_a_clear_nonzero_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing pip (faked: no network) stops the build with its output and exit code 1."""
    function_dir = tmp_path / "fn"
    function_dir.mkdir()
    (function_dir / "app.py").write_text("def handler(event, context):\n    return 1\n")
    (function_dir / "requirements.txt").write_text("no-such-package==0\n")
    (tmp_path / "template.yaml").write_text(
        "Transform: AWS::Serverless-2016-10-31\n"
        "Resources:\n"
        "  Fn:\n"
        "    Type: AWS::Serverless::Function\n"
        "    Properties:\n"
        "      CodeUri: fn/\n"
        "      Handler: app.handler\n"
        "      Runtime: python3.12\n"
        "      Architectures: [arm64]\n"
    )
    calls: list[list[str]] = []

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for no-such-package==0"

    def fake_run(command: list[str], **_kwargs: Any) -> Failed:
        calls.append(command)
        return Failed()

    monkeypatch.setattr(build_artifacts.subprocess, "run", fake_run)
    argv = ["--template", str(tmp_path / "template.yaml"), "--build-dir", str(tmp_path / "out")]
    assert build_artifacts.main(argv) == 1

    err = capsys.readouterr().err
    assert "pip failed" in err
    assert "No matching distribution" in err
    (command,) = calls
    assert command[command.index("--platform") + 1] == "manylinux2014_aarch64"
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "--only-binary=:all:" in command
    assert command[command.index("--target") + 1] == str(tmp_path / "out" / "Fn")


def test_refuses_to_wipe_the_project(tmp_path: Path) -> None:
    with pytest.raises(build_artifacts.BuildError):
        build_artifacts.reset_build_dir(tmp_path, tmp_path / "project")
