"""template.yaml's side of real GPU servers: the endpoint parameters' constraints, the
credential grants (scoped to the stack's prefixes, only on the functions that call GPUs),
and the optional VpcConfig."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import pytest

from gpuqueue_local.sam_transform import function_role, transformed_template
from gpuqueue_local.template import (
    Resolver,
    RuleViolation,
    load_template,
    parameter_values,
    resources_of_type,
)

TEMPLATE = load_template()
FUNCTIONS = resources_of_type(TEMPLATE, "AWS::Serverless::Function")
# The functions that call GPU endpoints (and their health checks).
GPU_CALLERS = {
    "DispatcherFunction",
    "PriorityDispatcherFunction",
    "SpeechFunction",
    "CheckerFunction",
    "GpuCallbackFunction",  # cancels a callback-mode prediction on its server
}
STACK = "prod-gpuq"
ACCOUNT = "123456789012"
PSEUDO = {
    "AWS::StackName": STACK,
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": ACCOUNT,
    "AWS::Partition": "aws",
}
VPC_ACCESS_POLICY = "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"


def resolver(**parameters: str) -> Resolver:
    return Resolver.for_template(TEMPLATE, parameter_values(TEMPLATE, parameters), dict(PSEUDO))


def env(logical_id: str, *names: str) -> dict[str, Any]:
    variables = FUNCTIONS[logical_id]["Properties"]["Environment"]["Variables"]
    return {name: resolver().resolve(variables[name]) for name in names}


def vpc_config(logical_id: str, r: Resolver) -> Any:
    """The function's VpcConfig as deployed (None: not in a VPC)."""
    return r.resolve(FUNCTIONS[logical_id]["Properties"].get("VpcConfig"))


def statements(logical_id: str) -> list[dict[str, Any]]:
    found = []
    for entry in FUNCTIONS[logical_id]["Properties"].get("Policies", []):
        if isinstance(entry, dict) and "Statement" in entry:
            found += entry["Statement"]
    return found


def granted(logical_id: str, action: str) -> list[str]:
    """The resources (resolved for stack prod-gpuq) a function may `action`."""
    r = resolver()
    resources = []
    for statement in statements(logical_id):
        actions = statement["Action"]
        if action in (actions if isinstance(actions, list) else [actions]):
            value = r.resolve(statement["Resource"])
            resources += value if isinstance(value, list) else [value]
    return resources


# --- the endpoint parameters ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["ImageEndpoints", "SpeechEndpoints"])
def test_the_endpoint_list_parameters_are_optional_json_lists_within_cloudformations_limit(
    name: str,
) -> None:
    spec = TEMPLATE["Parameters"][name]
    pattern = re.compile(spec["AllowedPattern"])

    assert (spec["Type"], spec["Default"], spec["MaxLength"]) == ("String", "", 4096)
    for accepted in ["", "[]", '[{"url": "http://a"}]', '\n  [\n {"url": "http://a"}\n]\n']:
        assert pattern.fullmatch(accepted), accepted
    for refused in ['{"url": "http://a"}', "http://a", '[{"url": "http://a"}] x']:
        assert not pattern.fullmatch(refused), refused
    assert "JSON list" in spec["ConstraintDescription"]


def test_the_url_list_parameters_are_kept_as_they_were() -> None:
    for name in ("ImageEndpointUrls", "SpeechEndpointUrls"):
        assert TEMPLATE["Parameters"][name] == {
            **TEMPLATE["Parameters"][name],
            "Type": "String",
            "Default": "",
        }


def test_the_checker_gets_both_declarations_of_both_kinds() -> None:
    env = FUNCTIONS["CheckerFunction"]["Properties"]["Environment"]["Variables"]

    assert env["IMAGE_ENDPOINT_URLS"] == {"Ref": "ImageEndpointUrls"}
    assert env["SPEECH_ENDPOINT_URLS"] == {"Ref": "SpeechEndpointUrls"}
    assert env["IMAGE_ENDPOINTS"] == {"Ref": "ImageEndpoints"}
    assert env["SPEECH_ENDPOINTS"] == {"Ref": "SpeechEndpoints"}


# --- credentials: the prefixes and the grants -----------------------------------------------


@pytest.mark.parametrize("logical_id", sorted(GPU_CALLERS | {"AdminFunction"}))
def test_functions_that_call_or_configure_gpus_know_the_stacks_credential_prefixes(
    logical_id: str,
) -> None:
    assert env(logical_id, "GPU_SECRET_PREFIX", "GPU_PARAMETER_PREFIX") == {
        "GPU_SECRET_PREFIX": f"{STACK}/gpu/",
        "GPU_PARAMETER_PREFIX": f"/{STACK}/gpu/",
    }


@pytest.mark.parametrize("logical_id", sorted(GPU_CALLERS))
def test_gpu_callers_may_read_exactly_the_secrets_and_parameters_under_the_prefixes(
    logical_id: str,
) -> None:
    secrets = granted(logical_id, "secretsmanager:GetSecretValue")
    parameters = granted(logical_id, "ssm:GetParameter")
    arn = f"arn:aws:secretsmanager:eu-west-1:{ACCOUNT}:secret:"
    parameter_arn = f"arn:aws:ssm:eu-west-1:{ACCOUNT}:parameter"

    assert secrets == [f"{arn}{STACK}/gpu/*"]
    assert parameters == [f"{parameter_arn}/{STACK}/gpu/*"]
    # What the grant matches (a secret's ARN ends in AWS's random 6-character suffix) and
    # what it does not: another stack's (even one whose name starts the same), other paths.
    assert fnmatch.fnmatchcase(f"{arn}{STACK}/gpu/sd-1-AbC123", secrets[0])
    assert fnmatch.fnmatchcase(f"{parameter_arn}/{STACK}/gpu/team/whisper", parameters[0])
    for other in (f"{STACK}-2/gpu/x-AbC123", f"{STACK}/webhook-AbC123", "other/gpu/x-AbC123"):
        assert not fnmatch.fnmatchcase(f"{arn}{other}", secrets[0]), other
    assert not fnmatch.fnmatchcase(f"{parameter_arn}/{STACK}/db/password", parameters[0])


def test_the_grants_and_the_prefixes_the_code_checks_are_the_same() -> None:
    variables = env("DispatcherFunction", "GPU_SECRET_PREFIX", "GPU_PARAMETER_PREFIX")
    (secrets,) = granted("DispatcherFunction", "secretsmanager:GetSecretValue")
    (parameters,) = granted("DispatcherFunction", "ssm:GetParameter")

    assert secrets.endswith(f":secret:{variables['GPU_SECRET_PREFIX']}*")
    assert parameters.endswith(f":parameter{variables['GPU_PARAMETER_PREFIX']}*")


def test_no_other_function_may_read_gpu_credentials() -> None:
    readers = {
        logical_id
        for logical_id in FUNCTIONS
        for statement in statements(logical_id)
        for action in (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        if action.startswith(("ssm:", "kms:")) or "/gpu/" in str(statement["Resource"])
    }

    assert readers == GPU_CALLERS


def test_the_admin_api_checks_references_but_cannot_read_them() -> None:
    actions = {
        action
        for statement in statements("AdminFunction")
        for action in (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
    }

    assert not {a for a in actions if a.startswith(("secretsmanager:", "ssm:"))}


# --- private GPU servers: the optional VpcConfig --------------------------------------------


@pytest.mark.parametrize("name", ["VpcSubnetIds", "VpcSecurityGroupIds"])
def test_the_vpc_parameters_are_optional_lists(name: str) -> None:
    spec = TEMPLATE["Parameters"][name]

    assert (spec["Type"], spec["Default"]) == ("CommaDelimitedList", "")


def test_without_vpc_parameters_no_function_is_in_a_vpc() -> None:
    r = resolver()

    assert r.condition("HasVpc") is False
    assert [f for f in FUNCTIONS if vpc_config(f, r) is not None] == []


def test_with_vpc_parameters_exactly_the_gpu_callers_are_in_the_vpc() -> None:
    r = resolver(VpcSubnetIds="subnet-a, subnet-b", VpcSecurityGroupIds="sg-1")
    configs = {f: vpc_config(f, r) for f in FUNCTIONS if vpc_config(f, r) is not None}

    assert set(configs) == GPU_CALLERS
    for config in configs.values():
        assert config == {"SubnetIds": ["subnet-a", "subnet-b"], "SecurityGroupIds": ["sg-1"]}


@pytest.mark.parametrize(
    "parameters",
    [{"VpcSubnetIds": "subnet-a"}, {"VpcSecurityGroupIds": "sg-1"}],
    ids=["subnets-only", "security-groups-only"],
)
def test_half_a_vpc_configuration_is_refused_before_the_deploy(parameters: dict[str, str]) -> None:
    with pytest.raises(RuleViolation, match="VpcSubnetIds and VpcSecurityGroupIds go together"):
        resolver(**parameters).check_rules(TEMPLATE["Rules"])


def test_sam_gives_the_gpu_callers_roles_what_lambda_needs_for_vpc_network_interfaces() -> None:
    # SAM attaches AWSLambdaVPCAccessExecutionRole to any function with a VpcConfig, even an
    # Fn::If that resolves to no VPC: the four GPU callers carry the ENI permissions on
    # every deploy (they grant no data access); no other function does.
    transformed = transformed_template()
    with_vpc_access = {
        logical_id
        for logical_id in FUNCTIONS
        if VPC_ACCESS_POLICY in function_role(transformed, logical_id).get("ManagedPolicyArns", [])
    }

    assert with_vpc_access == GPU_CALLERS
