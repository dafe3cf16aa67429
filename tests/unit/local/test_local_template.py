"""The local stack's intrinsic resolver: conditions, Fn::If and AWS::NoValue, list
parameters, Fn::Join over lists, and Rules, as CloudFormation evaluates them."""

from __future__ import annotations

from typing import Any

import pytest

from gpuqueue_local.template import (
    Resolver,
    RuleViolation,
    TemplateError,
    function_environment,
    load_template,
    parameter_values,
)

TEMPLATE: dict[str, Any] = {
    "Parameters": {
        "Email": {"Type": "String", "Default": ""},
        "Subnets": {"Type": "CommaDelimitedList", "Default": ""},
        "Groups": {"Type": "CommaDelimitedList", "Default": ""},
        "Stage": {"Type": "String", "Default": "dev"},
        "Size": {"Type": "Number", "Default": 2},
    },
    "Conditions": {
        "HasEmail": {"Fn::Not": [{"Fn::Equals": [{"Ref": "Email"}, ""]}]},
        "HasSubnets": {"Fn::Not": [{"Fn::Equals": [{"Fn::Join": ["", {"Ref": "Subnets"}]}, ""]}]},
        "HasGroups": {"Fn::Not": [{"Fn::Equals": [{"Fn::Join": ["", {"Ref": "Groups"}]}, ""]}]},
        "HasVpc": {"Fn::And": [{"Condition": "HasSubnets"}, {"Condition": "HasGroups"}]},
        "IsProd": {"Fn::Equals": ["prod", {"Ref": "Stage"}]},
        "ProdOrEmail": {"Fn::Or": [{"Condition": "IsProd"}, {"Condition": "HasEmail"}]},
        "IsTwo": {"Fn::Equals": [{"Ref": "Size"}, 2]},
    },
}


def resolver(**parameters: str) -> Resolver:
    return Resolver.for_template(
        TEMPLATE,
        parameters=parameter_values(TEMPLATE, parameters),
        pseudo={"AWS::StackName": "s", "AWS::Region": "us-east-1"},
    )


VPC_CONFIG = {
    "Fn::If": [
        "HasVpc",
        {"SubnetIds": {"Ref": "Subnets"}, "SecurityGroupIds": {"Ref": "Groups"}},
        {"Ref": "AWS::NoValue"},
    ]
}


def test_a_comma_delimited_list_parameter_refs_as_a_trimmed_list() -> None:
    values = resolver(Subnets="subnet-a, subnet-b").resolve({"Ref": "Subnets"})

    assert values == ["subnet-a", "subnet-b"]


def test_an_empty_comma_delimited_list_is_one_empty_string() -> None:
    assert resolver().resolve({"Ref": "Subnets"}) == [""]


def test_join_takes_a_list_parameter_or_a_literal_list() -> None:
    r = resolver(Subnets="a,b")

    assert r.resolve({"Fn::Join": ["-", {"Ref": "Subnets"}]}) == "a-b"
    assert r.resolve({"Fn::Join": ["/", ["x", {"Ref": "Stage"}]]}) == "x/dev"


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, {"HasEmail": False, "HasVpc": False, "IsProd": False, "ProdOrEmail": False}),
        ({"Email": "ops@example.com"}, {"HasEmail": True, "ProdOrEmail": True}),
        ({"Stage": "prod"}, {"IsProd": True, "ProdOrEmail": True}),
        ({"Subnets": "subnet-a"}, {"HasSubnets": True, "HasVpc": False}),
        ({"Subnets": "subnet-a", "Groups": "sg-1"}, {"HasVpc": True}),
    ],
)
def test_conditions_evaluate_equals_not_and_or_and_condition_references(
    parameters: dict[str, str], expected: dict[str, bool]
) -> None:
    r = resolver(**parameters)

    assert {name: r.condition(name) for name in expected} == expected


def test_equals_compares_a_number_parameter_with_a_literal_number() -> None:
    assert resolver().condition("IsTwo") is True


def test_if_picks_its_branch_by_the_condition() -> None:
    r = resolver(Subnets="subnet-a,subnet-b", Groups="sg-1")

    assert r.resolve({"VpcConfig": VPC_CONFIG}) == {
        "VpcConfig": {"SubnetIds": ["subnet-a", "subnet-b"], "SecurityGroupIds": ["sg-1"]}
    }


def test_no_value_removes_the_key_it_is_the_value_of() -> None:
    resolved = resolver().resolve({"Timeout": 10, "VpcConfig": VPC_CONFIG})

    assert resolved == {"Timeout": 10}


def test_no_value_in_a_list_drops_the_item_and_at_the_top_is_none() -> None:
    r = resolver()
    item = {"Fn::If": ["IsProd", "prod-only", {"Ref": "AWS::NoValue"}]}

    assert r.resolve(["always", item]) == ["always"]
    assert r.resolve(item) is None


def test_an_unknown_condition_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="NoSuchCondition"):
        resolver().resolve({"Fn::If": ["NoSuchCondition", 1, 2]})


def test_a_condition_that_depends_on_itself_is_a_template_error() -> None:
    looping = {"Conditions": {"A": {"Fn::Not": [{"Condition": "A"}]}}}
    r = Resolver.for_template(looping, parameters={}, pseudo={})

    with pytest.raises(TemplateError, match="depends on itself"):
        r.condition("A")


def test_an_environment_variable_set_to_no_value_is_left_out() -> None:
    template = {
        **TEMPLATE,
        "Resources": {
            "Fn": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "Environment": {
                        "Variables": {
                            "ALWAYS": {"Fn::Sub": "${AWS::StackName}/gpu/"},
                            "PROD_ONLY": {"Fn::If": ["IsProd", "yes", {"Ref": "AWS::NoValue"}]},
                        }
                    }
                },
            }
        },
    }
    r = Resolver.for_template(template, parameter_values(template, {}), {"AWS::StackName": "s"})

    assert function_environment(template, "Fn", r) == {"ALWAYS": "s/gpu/"}


def test_a_resource_whose_condition_is_false_does_not_exist() -> None:
    r = resolver()

    assert r.resource_exists({"Type": "AWS::SNS::Subscription"}) is True
    assert r.resource_exists({"Type": "AWS::SNS::Subscription", "Condition": "HasEmail"}) is False


RULES = {
    "Together": {
        "Assertions": [
            {
                "Assert": {
                    "Fn::Or": [
                        {
                            "Fn::And": [
                                {"Fn::Contains": [{"Ref": "Subnets"}, ""]},
                                {"Fn::Contains": [{"Ref": "Groups"}, ""]},
                            ]
                        },
                        {
                            "Fn::And": [
                                {"Fn::Not": [{"Fn::Contains": [{"Ref": "Subnets"}, ""]}]},
                                {"Fn::Not": [{"Fn::Contains": [{"Ref": "Groups"}, ""]}]},
                            ]
                        },
                    ]
                },
                "AssertDescription": "subnets and groups go together",
            }
        ]
    },
    "ProdStageOnly": {
        "RuleCondition": {"Fn::Equals": [{"Ref": "Stage"}, "prod"]},
        "Assertions": [
            {
                "Assert": {"Fn::EachMemberIn": [{"Ref": "Groups"}, ["sg-prod"]]},
                "AssertDescription": "prod uses sg-prod",
            }
        ],
    },
}


@pytest.mark.parametrize(
    "parameters",
    [
        {},
        {"Subnets": "subnet-a", "Groups": "sg-1"},
        {"Stage": "prod", "Subnets": "subnet-a", "Groups": "sg-prod"},
    ],
    ids=["neither", "both", "rule-condition-met"],
)
def test_rules_that_hold_let_the_stack_be_created(parameters: dict[str, str]) -> None:
    resolver(**parameters).check_rules(RULES)


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"Subnets": "subnet-a"}, "rule Together: subnets and groups go together"),
        ({"Groups": "sg-1"}, "rule Together"),
        ({"Stage": "prod", "Subnets": "s", "Groups": "sg-1"}, "rule ProdStageOnly"),
    ],
)
def test_a_rule_that_fails_refuses_the_stack_with_its_description(
    parameters: dict[str, str], says: str
) -> None:
    with pytest.raises(RuleViolation, match=says):
        resolver(**parameters).check_rules(RULES)


def test_the_repositorys_template_resolves_with_its_defaults_and_with_a_vpc() -> None:
    template = load_template()
    pseudo = {
        "AWS::StackName": "s",
        "AWS::Region": "us-east-1",
        "AWS::AccountId": "123456789012",
        "AWS::Partition": "aws",
    }
    plain = Resolver.for_template(template, parameter_values(template, {}), pseudo)
    with_vpc = Resolver.for_template(
        template,
        parameter_values(
            template, {"VpcSubnetIds": "subnet-a,subnet-b", "VpcSecurityGroupIds": "sg-1"}
        ),
        pseudo,
    )
    plain.check_rules(template.get("Rules", {}))
    with_vpc.check_rules(template.get("Rules", {}))

    vpc_config = template["Resources"]["DispatcherFunction"]["Properties"]["VpcConfig"]
    assert plain.resolve({"VpcConfig": vpc_config}) == {}
    assert with_vpc.resolve({"VpcConfig": vpc_config}) == {
        "VpcConfig": {"SubnetIds": ["subnet-a", "subnet-b"], "SecurityGroupIds": ["sg-1"]}
    }
