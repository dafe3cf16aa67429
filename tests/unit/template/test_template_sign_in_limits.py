"""The sign-in limits' parameters and the optional CloudFront + WAF edge (WafRateLimit), as
CloudFormation and AWS would take them: every value a parameter allows is one the function's
settings and WAF accept, the edge exists only when asked for and only in us-east-1."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from gpuqueue.auth.sign_in_throttle import (
    ORIGIN_VERIFY_HEADER,
    VIEWER_ADDRESS_HEADER,
    source_key,
    username_key,
)
from gpuqueue.settings import AuthSettings
from gpuqueue_local.template import (
    Resolver,
    RuleViolation,
    function_environment,
    load_template,
    parameter_values,
)

TEMPLATE = load_template()
PARAMETERS: dict[str, dict[str, Any]] = TEMPLATE["Parameters"]
EDGE = ["OriginVerifySecret", "ViewerAddressFunction", "ApiWebAcl", "ApiDistribution"]
# AWS WAF's documented bounds for a rate-based rule's Limit (requests per 5 minutes).
WAF_LIMIT_RANGE = (10, 2_000_000_000)
# What AuthSettings needs besides the limits.
AUTH_REQUIRED = {"user_pool_id": "p", "user_pool_client_id": "c", "limits_table": "t"}
# Each limit's env var on AuthFunction -> its parameter.
LIMIT_PARAMETERS = {
    "LOGIN_USERNAME_FAILURE_BURST": "LoginUsernameFailureBurst",
    "LOGIN_USERNAME_FAILURE_REFILL_SECONDS": "LoginUsernameFailureRefillSeconds",
    "LOGIN_SOURCE_FAILURE_BURST": "LoginSourceFailureBurst",
    "LOGIN_SOURCE_FAILURE_REFILL_SECONDS": "LoginSourceFailureRefillSeconds",
    "REGISTER_SOURCE_BURST": "RegisterSourceBurst",
    "REGISTER_SOURCE_REFILL_SECONDS": "RegisterSourceRefillSeconds",
}


def resolver(region: str = "us-east-1", **overrides: str) -> Resolver:
    return Resolver(
        parameters=parameter_values(TEMPLATE, overrides),
        pseudo={"AWS::Region": region, "AWS::StackName": "gpuqueue", "AWS::URLSuffix": "x"},
        conditions=dict(TEMPLATE["Conditions"]),
    )


def auth_env(r: Resolver) -> dict[str, str]:
    r.refs.update(
        {
            name: name
            for name in TEMPLATE["Resources"]
            if r.resource_exists(TEMPLATE["Resources"][name])
        }
    )
    return function_environment(TEMPLATE, "AuthFunction", r)


def test_auth_function_gets_every_limit_from_its_parameter_and_the_limits_table() -> None:
    env = auth_env(resolver())
    assert env["LIMITS_TABLE"] == "LimitsTable"
    for variable, parameter in LIMIT_PARAMETERS.items():
        assert env[variable] == str(PARAMETERS[parameter]["Default"])
    # The settings the function reads take the template's defaults as they are.
    settings = AuthSettings.model_validate({k.lower(): v for k, v in env.items()})
    assert settings.register_source_burst == 5
    assert settings.origin_verify_secret is None


@pytest.mark.parametrize("variable", sorted(LIMIT_PARAMETERS))
def test_every_value_the_parameter_allows_is_one_the_function_accepts(variable: str) -> None:
    spec = PARAMETERS[LIMIT_PARAMETERS[variable]]
    low, high = spec["MinValue"], spec["MaxValue"]
    field = variable.lower()
    for value in (low, high, spec["Default"]):
        AuthSettings.model_validate({**AUTH_REQUIRED, field: value})
    # and the function's bounds are the template's: nothing it would refuse deploys.
    for value in (low - 1, high + 1):
        with pytest.raises(ValidationError):
            AuthSettings.model_validate({**AUTH_REQUIRED, field: value})


@pytest.mark.parametrize("value", ["0", "10", "100", "2000", "999999999"])
def test_waf_rate_limit_allows_off_and_what_waf_accepts(value: str) -> None:
    pattern = PARAMETERS["WafRateLimit"]["AllowedPattern"]
    assert re.fullmatch(pattern, value)
    assert value == "0" or WAF_LIMIT_RANGE[0] <= int(value) <= WAF_LIMIT_RANGE[1]


@pytest.mark.parametrize("value", ["", "1", "9", "-1", "010", "1e3", "12.5", "abc", "3000000000"])
def test_waf_rate_limit_refuses_what_waf_would_refuse(value: str) -> None:
    assert not re.fullmatch(PARAMETERS["WafRateLimit"]["AllowedPattern"], value)


def test_the_edge_is_off_by_default_with_nothing_deployed_for_it() -> None:
    r = resolver()
    resources = TEMPLATE["Resources"]
    assert PARAMETERS["WafRateLimit"]["Default"] == "0"
    assert not any(r.resource_exists(resources[name]) for name in EDGE)
    assert not r.resource_exists(TEMPLATE["Outputs"]["ApiCloudFrontUrl"])
    assert "ORIGIN_VERIFY_SECRET" not in auth_env(r)


def test_a_waf_rate_limit_puts_a_rate_based_web_acl_on_a_distribution_in_front_of_the_api() -> None:
    r = resolver(WafRateLimit="300")
    resources = TEMPLATE["Resources"]
    assert all(r.resource_exists(resources[name]) for name in EDGE)

    acl = resources["ApiWebAcl"]["Properties"]
    assert acl["Scope"] == "CLOUDFRONT"
    (rule,) = acl["Rules"]
    assert r.resolve(rule["Statement"]["RateBasedStatement"]) == {
        "Limit": "300",
        "AggregateKeyType": "IP",
    }
    assert rule["Action"]["Block"]["CustomResponse"]["ResponseCode"] == 429

    config = resources["ApiDistribution"]["Properties"]["DistributionConfig"]
    assert config["WebACLId"] == {"Fn::GetAtt": ["ApiWebAcl", "Arn"]}
    (origin,) = config["Origins"]
    assert "${HttpApi}.execute-api" in origin["DomainName"]["Fn::Sub"]
    assert origin["CustomOriginConfig"]["OriginProtocolPolicy"] == "https-only"
    (header,) = origin["OriginCustomHeaders"]
    # The header CloudFront sends carries the very secret AuthFunction compares it with.
    assert header["HeaderName"].lower() == ORIGIN_VERIFY_HEADER
    env = resources["AuthFunction"]["Properties"]["Environment"]["Variables"]
    assert header["HeaderValue"] == env["ORIGIN_VERIFY_SECRET"]["Fn::If"][1]
    assert "${OriginVerifySecret}" in header["HeaderValue"]["Fn::Sub"]
    assert "ORIGIN_VERIFY_SECRET" in auth_env(r)

    # The viewer's address reaches the function under the name it reads, set by CloudFront.
    behavior = config["DefaultCacheBehavior"]
    (association,) = behavior["FunctionAssociations"]
    assert association["EventType"] == "viewer-request"
    code = resources["ViewerAddressFunction"]["Properties"]["FunctionCode"]
    assert f"request.headers['{VIEWER_ADDRESS_HEADER}'] = {{value: event.viewer.ip}}" in code
    # Every method the API has passes; nothing is cached.
    assert set(behavior["AllowedMethods"]) >= {"GET", "POST", "PUT", "DELETE"}
    assert behavior["CachePolicyId"] == "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"


@pytest.mark.parametrize("region", ["us-west-2", "eu-west-1"])
def test_the_edge_is_refused_outside_us_east_1(region: str) -> None:
    with pytest.raises(RuleViolation, match="us-east-1"):
        resolver(region, WafRateLimit="300").check_rules(TEMPLATE["Rules"])
    resolver(region).check_rules(TEMPLATE["Rules"])  # off: any region
    resolver("us-east-1", WafRateLimit="300").check_rules(TEMPLATE["Rules"])


def test_usernames_share_a_bucket_across_case_and_width() -> None:
    assert (
        username_key("Alice")
        == username_key("alice")
        == username_key("\uff21\uff2c\uff29\uff23\uff25")
    )  # fullwidth
    assert username_key("alice") != username_key("alice2")


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2::abcd", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff:1:2:3", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
    ],
)
def test_a_source_is_its_address_or_its_ipv6_64(address: str, key: str) -> None:
    assert source_key(address) == key
