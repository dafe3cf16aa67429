"""The local stack's intrinsic resolver: conditions, Fn::If and AWS::NoValue as
CloudFormation evaluates them (the template sizes the priority lane with them)."""

from __future__ import annotations

import pytest

from gpuqueue_local.template import Resolver, TemplateError, load_template, parameter_values

CONDITIONS = {
    "OneWorker": {"Fn::Equals": [{"Ref": "Workers"}, "1"]},
    "ManyWorkers": {"Fn::Not": [{"Condition": "OneWorker"}]},
    "HasEmail": {"Fn::Not": [{"Fn::Equals": [{"Ref": "Email"}, ""]}]},
    "ManyWithEmail": {"Fn::And": [{"Condition": "ManyWorkers"}, {"Condition": "HasEmail"}]},
    "OneOrEmail": {"Fn::Or": [{"Condition": "OneWorker"}, {"Condition": "HasEmail"}]},
}


def resolver(workers: str, email: str = "") -> Resolver:
    return Resolver(
        parameters={"Workers": workers, "Email": email},
        pseudo={"AWS::Region": "us-east-1"},
        conditions=CONDITIONS,
    )


@pytest.mark.parametrize(("workers", "expected"), [("1", "2"), ("2", "2"), ("7", "7")])
def test_fn_if_picks_the_branch_its_condition_names(workers: str, expected: str) -> None:
    at_least_two = {"Fn::If": ["OneWorker", 2, {"Ref": "Workers"}]}

    assert str(resolver(workers).resolve(at_least_two)) == expected


def test_conditions_combine_with_not_and_or_and_other_conditions() -> None:
    assert resolver("3", "ops@example.com").condition("ManyWithEmail") is True
    assert resolver("1", "ops@example.com").condition("ManyWithEmail") is False
    assert resolver("3").condition("OneOrEmail") is False
    assert resolver("1").condition("OneOrEmail") is True


def test_no_value_drops_the_property_or_the_list_item() -> None:
    properties = {
        "Reserved": {"Fn::If": ["OneWorker", {"Ref": "AWS::NoValue"}, {"Ref": "Workers"}]},
        "Actions": ["a", {"Fn::If": ["HasEmail", "mail", {"Ref": "AWS::NoValue"}]}],
    }

    assert resolver("1").resolve(properties) == {"Actions": ["a"]}
    assert resolver("4", "x@example.com").resolve(properties) == {
        "Reserved": "4",
        "Actions": ["a", "mail"],
    }


def test_an_unknown_condition_is_an_error_not_false() -> None:
    with pytest.raises(TemplateError):
        resolver("1").resolve({"Fn::If": ["Missing", 1, 2]})


def test_the_templates_own_conditions_evaluate_with_its_parameters() -> None:
    template = load_template()

    def alarm_mail(address: str) -> bool:
        parameters = parameter_values(template, {"AlarmEmail": address})
        local = Resolver(parameters=parameters, pseudo={}, conditions=template["Conditions"])
        return local.condition("HasAlarmEmail")

    assert alarm_mail("") is False
    assert alarm_mail("ops@example.com") is True
