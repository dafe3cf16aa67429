"""The AWS SDK the layer ships. On Lambda the layer's /opt/python comes before the runtime's
own boto3, so a layer with botocore but no boto3 runs the runtime's boto3 on our botocore:
a pair no test ran. The layer ships both, pinned at what the dev venv tests with."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import build_artifacts  # tools/ is on the test path (tests/conftest.py)
from build_artifacts import Shipped

ROOT = Path(__file__).resolve().parents[3]
LAYER_REQUIREMENTS = ROOT / "layers" / "common" / "requirements.txt"
# What pip --platform manylinux2014_aarch64 --python-version 3.12 resolves markers against.
LAMBDA_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "aarch64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def _requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(
        requirement.marker.evaluate({**LAMBDA_MARKERS, "extra": extra}) for extra in extras or {""}
    )


def _shipped_by(requirements: list[Requirement]) -> dict[str, Shipped]:
    """Every distribution the requirements bring in, from the metadata the dev venv installed
    them with (it installs the layer's requirements): what `make build` would put in the layer."""
    shipped: dict[str, Shipped] = {}
    pending = [(r, set(r.extras)) for r in requirements]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in shipped:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is not installed in the dev venv: run make venv")
        shipped[name] = Shipped(dist.version, tuple(dist.requires or ()))
        for line in dist.requires or ():
            needed = Requirement(line)
            if _applies(needed, extras):
                pending.append((needed, set(needed.extras)))
    return shipped


def test_the_layer_ships_botocore_only_with_a_boto3_that_accepts_it() -> None:
    shipped = _shipped_by(_requirements(LAYER_REQUIREMENTS))

    # Powertools' tracer brings botocore in (aws-xray-sdk); were it gone, so is the risk.
    assert "botocore" in shipped
    assert build_artifacts.sdk_pair_problem(shipped) is None


def test_the_layers_boto3_and_botocore_are_the_ones_the_tests_run_on() -> None:
    pins = {canonicalize_name(r.name): str(r.specifier) for r in _requirements(LAYER_REQUIREMENTS)}

    assert pins["boto3"] == f"=={version('boto3')}"
    assert pins["botocore"] == f"=={version('botocore')}"


BOTO3 = Shipped("1.44.5", ("botocore (<1.45.0,>=1.44.5)", "s3transfer (<0.20.0,>=0.19.0)"))


@pytest.mark.parametrize(
    ("shipped", "problem"),
    [
        pytest.param({"botocore": Shipped("1.44.18")}, "without boto3", id="botocore alone"),
        pytest.param(
            {"boto3": BOTO3, "botocore": Shipped("1.43.9")}, "wants botocore", id="boto3 too new"
        ),
        pytest.param({"boto3": BOTO3, "botocore": Shipped("1.44.18")}, None, id="a pair"),
        pytest.param({"requests": Shipped("2.34.2")}, None, id="no SDK at all"),
    ],
)
def test_what_makes_a_shipped_sdk_a_tested_pair(
    shipped: dict[str, Shipped], problem: str | None
) -> None:
    found = build_artifacts.sdk_pair_problem(shipped)

    assert (found is None) == (problem is None)
    assert problem is None or problem in str(found)


def _dist_info(site: Path, name: str, version_: str, *requires: str) -> None:
    info = site / f"{name}-{version_}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version_}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_the_build_refuses_a_layer_that_pip_filled_with_botocore_alone(tmp_path: Path) -> None:
    _dist_info(tmp_path, "botocore", "1.44.18")
    _dist_info(tmp_path, "aws-xray-sdk", "2.15.0", "botocore>=1.11.3")

    with pytest.raises(build_artifacts.BuildError, match=r"CommonLayer ships botocore 1\.44\.18"):
        build_artifacts.check_sdk_pair(tmp_path, "CommonLayer")

    _dist_info(tmp_path, "boto3", "1.44.5", "botocore (<1.45.0,>=1.44.5)")
    build_artifacts.check_sdk_pair(tmp_path, "CommonLayer")  # a pair: no error
