"""Build deployable SAM artifacts without Docker by cross-installing wheels.

Does what ``sam build`` does for this project's python functions and layers, but installs the
dependencies with ``pip --platform ... --only-binary=:all:`` for the Lambda runtime (for example
python3.12 on arm64) instead of building inside a container, so it runs on any machine.

Output, like ``sam build``: ``<build-dir>/<LogicalId>/`` per function and layer (a layer's code
under ``python/``) and ``<build-dir>/template.yaml`` whose ``CodeUri``/``ContentUri`` point at
those directories. The template is written as JSON (valid YAML), which keeps every intrinsic
function in its long form (``{"Ref": ...}``, ``{"Fn::Sub": ...}``). ``sam deploy`` reads it
by default.

Bytecode: Lambda's code is read-only, so a module shipped without its ``.pyc`` is compiled
again on every cold start (measured here: the tasks function's imports take 2.4x the CPU from
source than from bytecode, boto3 alone 2.6x). The build compiles every artifact with the
runtime's own Python (``python3.12`` for python3.12: bytecode is per version), hash-based and
unchecked (``--invalidation-mode unchecked-hash``: no timestamps, so the same sources give the
same bytes and a rebuild changes nothing). Without that interpreter on the machine it says so
and ships sources only, as before.

Usage::

    python tools/build_artifacts.py [--template template.yaml] [--build-dir .aws-sam/build]
                                    [--skip-deps]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

from cfnlint.decode import cfn_yaml  # the dev venv has it (requirements-dev.txt)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

FUNCTION_TYPE = "AWS::Serverless::Function"
LAYER_TYPE = "AWS::Serverless::LayerVersion"

PLATFORMS = {
    "arm64": "manylinux2014_aarch64",
    "x86_64": "manylinux2014_x86_64",
}
DEFAULT_ARCHITECTURE = "x86_64"  # Lambda's and SAM's default when none is given
REQUIREMENTS = "requirements.txt"
LAYER_BUILD_KEYS = ("BuildMethod", "BuildArchitecture")
# Never shipped: bytecode of the build machine's Python (the runtime's is compiled after the copy:
# compile_bytecode), caches, tests.
IGNORED_NAMES = (
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "tests",
    "test",
    ".DS_Store",
)
LAMBDA_UNZIPPED_LIMIT_MB = 250.0
FUNCTION_ROOT = "/var/task"  # where Lambda unpacks a function's code
LAYER_ROOT = "/opt/python"  # where a python layer's `python/` lands


class BuildError(Exception):
    """A build step failed; the message says which and why."""


@dataclass(frozen=True)
class Target:
    """The Lambda runtime a set of wheels must fit."""

    runtime: str  # e.g. python3.12
    architecture: str  # arm64 | x86_64

    def validated(self) -> Target:
        """Fail before anything is copied if the runtime or architecture cannot be built."""
        _ = self.python_version, self.platform
        return self

    @property
    def python_version(self) -> str:
        if not self.runtime.startswith("python3."):
            raise BuildError(f"unsupported runtime {self.runtime!r}: only python3.x is built")
        return self.runtime.removeprefix("python")

    @property
    def platform(self) -> str:
        try:
            return PLATFORMS[self.architecture]
        except KeyError:
            raise BuildError(
                f"unsupported architecture {self.architecture!r}: expected one of "
                f"{', '.join(PLATFORMS)}"
            ) from None


@dataclass(frozen=True)
class BuildContext:
    globals_function: dict[str, Any]  # Globals.Function: defaults for every function
    base: Path  # the source template's directory: CodeUri/ContentUri are relative to it
    build_dir: Path
    skip_deps: bool
    # The interpreter per runtime version ("3.12") that compiles the bytecode; None: none found.
    compilers: dict[str, Path | None]


@dataclass(frozen=True)
class Artifact:
    logical_id: str
    kind: str  # function | layer
    path: Path
    layers: tuple[str, ...] = ()  # a function's layers, as the logical ids it !Refs


# ---------------------------------------------------------------- template I/O


def to_plain(value: Any) -> Any:
    """cfn-lint's node classes (dict/str subclasses with marks) -> plain JSON-able values."""
    if isinstance(value, dict):
        plain: Any = {str(key): to_plain(item) for key, item in value.items()}
    elif isinstance(value, list):
        plain = [to_plain(item) for item in value]
    elif value is None or isinstance(value, bool | int | float):
        plain = value
    elif isinstance(value, dt.date):  # an unquoted date; datetime is a date too
        plain = value.isoformat()
    else:
        plain = str(value)  # str nodes -> plain str
    return plain


def load_template(path: Path) -> dict[str, Any]:
    """Load a SAM template, short tags (!Ref, !Sub, !GetAtt ...) expanded to their long form."""
    try:
        loaded = cfn_yaml.load(str(path))
    except Exception as exc:  # cfn-lint raises several decode error types
        raise BuildError(f"cannot load template {path}: {exc}") from exc
    template = to_plain(loaded)
    if not isinstance(template, dict) or not isinstance(template.get("Resources"), dict):
        raise BuildError(f"{path} is not a CloudFormation template (no Resources mapping)")
    return template


def write_template(template: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(template, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- helpers


def literal_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BuildError(f"{what} must be a literal string, got {value!r}")
    return value


def architecture_of(value: Any, what: str) -> str:
    """`Architectures: [arm64]` (a list) or `BuildArchitecture: arm64` (a string)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BuildError(f"{what} must list exactly one architecture, got {value!r}")
        value = value[0]
    return literal_str(value, what)


def local_dir(uri: Any, base: Path) -> Path | None:
    """The local directory a CodeUri/ContentUri names, or None if it is not one (S3, dict)."""
    if not isinstance(uri, str) or uri.startswith("s3://"):
        return None
    path = (base / uri).resolve()
    if not path.is_dir():
        raise BuildError(f"{uri!r} is not a directory (resolved to {path})")
    return path


def ignore_for(*extra: str) -> Callable[[str, list[str]], set[str]]:
    return shutil.ignore_patterns(*IGNORED_NAMES, *extra)


def pip_install(requirements: Path, target_dir: Path, target: Target, label: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--no-compile",  # .pyc from this machine's Python would be dead weight on the runtime's
        "--platform",
        target.platform,
        "--python-version",
        target.python_version,
        "--implementation",
        "cp",
        "--only-binary=:all:",
        "--target",
        str(target_dir),
        "-r",
        str(requirements),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = "\n".join(part for part in (result.stdout, result.stderr) if part).rstrip()
        raise BuildError(
            f"pip failed (exit {result.returncode}) installing {requirements} for {label} "
            f"({target.runtime}/{target.architecture}, {target.platform}):\n{output}\n"
            f"command: {' '.join(command)}"
        )
    # `pip --target` leaves console scripts in bin/; they are of no use inside a Lambda.
    scripts = target_dir / "bin"
    if scripts.is_dir():
        shutil.rmtree(scripts)


@dataclass(frozen=True)
class Shipped:
    """A distribution an artifact ships: its version and its Requires-Dist lines."""

    version: str
    requires: tuple[str, ...] = ()


def sdk_pair_problem(shipped: Mapping[str, Shipped]) -> str | None:
    """Why shipping these distributions would break the AWS SDK, or None.

    On Lambda a layer's /opt/python comes before the runtime's own boto3, so a layer with
    botocore but no boto3 runs the runtime's (older) boto3 on the layer's botocore: a pair
    no test ran. Ship both, at versions boto3 itself accepts, or neither.
    """
    botocore = shipped.get("botocore")
    if botocore is None:
        return None
    boto3 = shipped.get("boto3")
    if boto3 is None:
        return (
            f"ships botocore {botocore.version} without boto3: the runtime's boto3 would run "
            "on it; pin boto3 and botocore together in the requirements"
        )
    for line in boto3.requires:
        requirement = Requirement(line)
        applies = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        if (
            canonicalize_name(requirement.name) == "botocore"
            and applies
            and not requirement.specifier.contains(botocore.version, prereleases=True)
        ):
            return (
                f"ships boto3 {boto3.version}, which wants botocore{requirement.specifier}, "
                f"with botocore {botocore.version}"
            )
    return None


def installed_distributions(site: Path) -> dict[str, Shipped]:
    """What pip installed into `site` (a function's or a layer's code directory)."""
    return {
        canonicalize_name(dist.metadata["Name"]): Shipped(dist.version, tuple(dist.requires or ()))
        for dist in distributions(path=[str(site)])
    }


def check_sdk_pair(site: Path, label: str) -> None:
    problem = sdk_pair_problem(installed_distributions(site))
    if problem is not None:
        raise BuildError(f"{label} {problem}")


def dir_size_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total / (1024 * 1024)


def reset_build_dir(build_dir: Path, template_dir: Path) -> None:
    resolved = build_dir.resolve()
    if resolved == Path(resolved.anchor) or resolved in (template_dir, *template_dir.parents):
        raise BuildError(f"refusing to wipe {resolved}: it holds the project itself")
    if resolved.exists():
        shutil.rmtree(resolved)
    resolved.mkdir(parents=True)


# ---------------------------------------------------------------- bytecode


def interpreter_version(python: Path) -> str | None:
    """`major.minor` of an interpreter, or None if it does not run (a pyenv shim of a
    version that is installed but not selected fails)."""
    try:
        done = subprocess.run(
            [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def runtime_python(version: str) -> Path | None:
    """An interpreter of exactly the runtime's version: on PATH, else under pyenv."""
    candidates: list[Path] = []
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(Path(on_path))
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    installed = pyenv_root.glob(f"versions/{version}.*/bin/python{version}")
    patch = re.compile(rf"{re.escape(version)}\.(\d+)")

    def newest_first(path: Path) -> int:
        found = patch.search(path.parent.parent.name)
        return -int(found.group(1)) if found else 0

    candidates += sorted(installed, key=newest_first)
    return next((c for c in candidates if interpreter_version(c) == version), None)


def compile_bytecode(path: Path, python: Path, label: str, *, deployed_at: str) -> None:
    """Every module under `path` compiled by `python`, hash-based and unchecked, naming its
    file where Lambda puts it (`deployed_at`: tracebacks show Lambda's paths, and the bytes
    do not depend on where the build ran)."""
    command = [str(python), "-m", "compileall", "-q", "-j", "0", "-s", str(path), "-p"]
    command += [deployed_at, "--invalidation-mode", "unchecked-hash", str(path)]
    # A fixed hash seed: a set literal's constant is stored in iteration order.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise BuildError(f"{label}: compiling its bytecode failed:\n{done.stdout}{done.stderr}")


def compiler_for(target: Target, ctx: BuildContext) -> Path | None:
    version = target.python_version
    if version not in ctx.compilers:
        ctx.compilers[version] = runtime_python(version)
        if ctx.compilers[version] is None:
            print(
                f"warning: no Python {version} here: the artifacts ship without bytecode, and "
                "Lambda compiles every module again on each cold start",
                file=sys.stderr,
            )
    return ctx.compilers[version]


# ---------------------------------------------------------------- build steps


def build_function(logical_id: str, resource: dict[str, Any], ctx: BuildContext) -> Artifact | None:
    props: dict[str, Any] = resource.setdefault("Properties", {})
    if props.get("PackageType", ctx.globals_function.get("PackageType")) == "Image":
        return None
    if "InlineCode" in props:
        return None
    source = local_dir(props.get("CodeUri", ctx.globals_function.get("CodeUri")), ctx.base)
    if source is None:
        return None

    runtime = literal_str(
        props.get("Runtime", ctx.globals_function.get("Runtime")), f"{logical_id} Runtime"
    )
    architecture = architecture_of(
        props.get(
            "Architectures", ctx.globals_function.get("Architectures", [DEFAULT_ARCHITECTURE])
        ),
        f"{logical_id} Architectures",
    )
    target = Target(runtime, architecture).validated()

    destination = ctx.build_dir / logical_id
    shutil.copytree(source, destination, ignore=ignore_for())
    requirements = source / REQUIREMENTS
    if requirements.is_file() and not ctx.skip_deps:
        pip_install(requirements, destination, target, logical_id)
        check_sdk_pair(destination, logical_id)
    compiler = compiler_for(target, ctx)
    if compiler is not None:
        compile_bytecode(destination, compiler, logical_id, deployed_at=FUNCTION_ROOT)

    props["CodeUri"] = logical_id
    layers = props.get("Layers", ctx.globals_function.get("Layers")) or []
    refs = tuple(layer["Ref"] for layer in layers if isinstance(layer, dict) and "Ref" in layer)
    return Artifact(logical_id, "function", destination, refs)


def build_layer(logical_id: str, resource: dict[str, Any], ctx: BuildContext) -> Artifact | None:
    props: dict[str, Any] = resource.setdefault("Properties", {})
    metadata: dict[str, Any] = resource.get("Metadata") or {}
    build_method = metadata.get("BuildMethod")
    if not (isinstance(build_method, str) and build_method.startswith("python3.")):
        return None  # prebuilt layer, or one built some other way: deployed as is
    source = local_dir(props.get("ContentUri"), ctx.base)
    if source is None:
        return None

    architecture = architecture_of(
        metadata.get(
            "BuildArchitecture",
            ctx.globals_function.get("Architectures", [DEFAULT_ARCHITECTURE]),
        ),
        f"{logical_id} BuildArchitecture",
    )
    target = Target(build_method, architecture).validated()

    destination = ctx.build_dir / logical_id
    site = destination / "python"
    shutil.copytree(source, site, ignore=ignore_for(REQUIREMENTS))
    requirements = source / REQUIREMENTS
    if requirements.is_file() and not ctx.skip_deps:
        pip_install(requirements, site, target, logical_id)
        check_sdk_pair(site, logical_id)
    compiler = compiler_for(target, ctx)
    if compiler is not None:
        compile_bytecode(site, compiler, logical_id, deployed_at=LAYER_ROOT)

    props["ContentUri"] = logical_id
    for key in LAYER_BUILD_KEYS:
        metadata.pop(key, None)  # built already: nothing for sam to build again
    if "Metadata" in resource and not metadata:
        del resource["Metadata"]
    return Artifact(logical_id, "layer", destination)


def build(
    template_path: Path, build_dir: Path, skip_deps: bool = False
) -> tuple[list[Artifact], Path]:
    """Build every local python function and layer; returns the artifacts and output template."""
    template_path = template_path.resolve()
    base = template_path.parent
    template = load_template(template_path)
    globals_function: dict[str, Any] = (template.get("Globals") or {}).get("Function") or {}

    reset_build_dir(build_dir, base)
    ctx = BuildContext(globals_function, base, build_dir, skip_deps, compilers={})
    artifacts: list[Artifact] = []
    for logical_id, resource in template["Resources"].items():
        if not isinstance(resource, dict):
            continue
        kind = resource.get("Type")
        if kind == FUNCTION_TYPE:
            artifact = build_function(logical_id, resource, ctx)
        elif kind == LAYER_TYPE:
            artifact = build_layer(logical_id, resource, ctx)
        else:
            continue
        if artifact is not None:
            artifacts.append(artifact)

    output = build_dir / "template.yaml"
    write_template(template, output)
    return artifacts, output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build SAM artifacts without Docker (cross-installed Lambda wheels)."
    )
    parser.add_argument("--template", type=Path, default=Path("template.yaml"))
    parser.add_argument("--build-dir", type=Path, default=Path(".aws-sam/build"))
    parser.add_argument(
        "--skip-deps", action="store_true", help="copy code only; do not pip-install requirements"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        artifacts, output = build(args.template, args.build_dir, skip_deps=args.skip_deps)
    except BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1

    sizes = {artifact.logical_id: dir_size_mb(artifact.path) for artifact in artifacts}
    for artifact in artifacts:
        size = sizes[artifact.logical_id]
        print(f"{artifact.kind:8} {artifact.logical_id:24} {size:9.3f} MB  {artifact.path}")
        unzipped = size + sum(sizes.get(layer, 0.0) for layer in artifact.layers)
        if unzipped > LAMBDA_UNZIPPED_LIMIT_MB:
            print(
                f"warning: {artifact.logical_id} with its layers is {unzipped:.1f} MB "
                f"unzipped, over Lambda's {LAMBDA_UNZIPPED_LIMIT_MB:.0f} MB limit",
                file=sys.stderr,
            )
    total = sum(sizes.values())
    print(f"{'total':33} {total:9.3f} MB")
    deps = "skipped" if args.skip_deps else "installed"
    print(
        f"built {len(artifacts)} artifacts (dependencies {deps}) in "
        f"{time.monotonic() - started:.1f} s; template: {output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
