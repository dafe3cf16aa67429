"""Reading template.yaml: load it with its short tags and resolve intrinsics locally.

The local stack and the tests read the template rather than repeating it, so a table,
queue or env var exists locally exactly when the template declares it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from cfnlint.decode.cfn_yaml import load as _cfn_load

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "template.yaml"

_SUB_VAR = re.compile(r"\$\{([^}!]+)\}")


def _plain(node: Any) -> Any:
    """cfn-lint's node types -> plain dict/list/str (so copies and comparisons behave)."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


@cache
def _template_json(path: str, mtime_ns: int, size: int) -> str:
    return json.dumps(_plain(_cfn_load(path)))


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """The template as plain values: a fresh copy each call, parsed once per file version
    (parsing takes ~65 ms; tests provision hundreds of stacks)."""
    stat = path.stat()
    loaded: dict[str, Any] = json.loads(_template_json(str(path), stat.st_mtime_ns, stat.st_size))
    return loaded


def resources_of_type(template: Mapping[str, Any], *types: str) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in template.get("Resources", {}).items()
        if resource.get("Type") in types
    }


class UnresolvedReference(LookupError):
    """An intrinsic names a resource that has no local physical id (yet)."""


class TemplateError(ValueError):
    """The template (or a parameter value) is something CloudFormation would refuse."""


class RuleViolation(TemplateError):
    """A `Rules` assertion failed: CloudFormation refuses the deploy with its description."""


class _NoValue:
    """`Ref: AWS::NoValue`: the property it is the value of is removed."""

    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()
# Parameter types whose Ref is a list of strings.
_LIST_TYPES = ("CommaDelimitedList", "List<")


def list_parameters(template: Mapping[str, Any]) -> frozenset[str]:
    """The parameters whose Ref gives a list (CommaDelimitedList, List<...>)."""
    return frozenset(
        name
        for name, spec in template.get("Parameters", {}).items()
        if str(spec.get("Type", "")).startswith(_LIST_TYPES)
    )


@dataclass
class Resolver:
    """Resolves intrinsics against local values as CloudFormation would: Ref (a list for
    CommaDelimitedList parameters), Fn::GetAtt, Fn::Sub, Fn::Join (over a list or a list
    parameter), Fn::Select, the template's Conditions (Fn::If, Fn::Equals, Fn::Not, Fn::And,
    Fn::Or, Condition), `Ref: AWS::NoValue` (the key is removed), and the rule functions
    Fn::Contains, Fn::EachMemberEquals and Fn::EachMemberIn."""

    parameters: dict[str, str]
    pseudo: dict[str, str]
    refs: dict[str, str] = field(default_factory=dict)
    attributes: dict[tuple[str, str], str] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)  # the template's Conditions
    list_parameters: frozenset[str] = frozenset()
    _condition_values: dict[str, bool] = field(default_factory=dict, init=False, repr=False)
    _evaluating: set[str] = field(default_factory=set, init=False, repr=False)

    @classmethod
    def for_template(
        cls, template: Mapping[str, Any], parameters: dict[str, str], pseudo: dict[str, str]
    ) -> Resolver:
        return cls(
            parameters=parameters,
            pseudo=pseudo,
            conditions=dict(template.get("Conditions", {})),
            list_parameters=list_parameters(template),
        )

    def ref(self, name: str) -> str:
        """A pseudo parameter, parameter (as given) or resource's physical id."""
        for table in (self.pseudo, self.parameters, self.refs):
            if name in table:
                return table[name]
        raise UnresolvedReference(name)

    def get_att(self, logical_id: str, attribute: str) -> str:
        try:
            return self.attributes[(logical_id, attribute)]
        except KeyError:
            raise UnresolvedReference(f"{logical_id}.{attribute}") from None

    def condition(self, name: str) -> bool:
        """A named condition of the template, evaluated once."""
        if name in self._condition_values:
            return self._condition_values[name]
        if name not in self.conditions:
            raise TemplateError(f"no condition named {name!r} in the template")
        if name in self._evaluating:
            raise TemplateError(f"condition {name!r} depends on itself")
        self._evaluating.add(name)
        try:
            value = self.truth(self.conditions[name])
        finally:
            self._evaluating.discard(name)
        self._condition_values[name] = value
        return value

    def truth(self, value: Any) -> bool:
        """A condition expression (or a `{"Condition": name}` reference) as a bool."""
        if isinstance(value, dict) and set(value) == {"Condition"}:
            return self.condition(str(value["Condition"]))
        resolved = self._resolve(value)
        if isinstance(resolved, bool):
            return resolved
        if isinstance(resolved, str) and resolved.lower() in ("true", "false"):
            return resolved.lower() == "true"
        raise TemplateError(f"not a condition: {value!r}")

    def resolve(self, value: Any) -> Any:
        """The value with every intrinsic resolved; a top-level AWS::NoValue is None."""
        resolved = self._resolve(value)
        return None if resolved is NO_VALUE else resolved

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self._resolve(v) for v in value]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            function = self._FUNCTIONS.get(key)
            if function is not None:
                return function(self, arg)
        resolved = {k: self._resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not NO_VALUE}

    # --- the intrinsic functions ---------------------------------------------------------

    def _fn_ref(self, arg: Any) -> Any:
        name = str(arg)
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.parameters and name in self.list_parameters:
            # CloudFormation splits on commas and trims each member; "" is [""].
            return [member.strip() for member in self.parameters[name].split(",")]
        return self.ref(name)

    def _fn_get_att(self, arg: Any) -> str:
        parts = arg if isinstance(arg, list) else str(arg).split(".", 1)
        return self.get_att(str(parts[0]), str(parts[1]))

    def _fn_join(self, arg: Any) -> str:
        separator, items = arg
        members = self._resolve(items)
        if not isinstance(members, list):
            raise TemplateError(f"Fn::Join needs a list, got {members!r}")
        return str(separator).join(_text(m) for m in members)

    def _fn_select(self, arg: Any) -> Any:
        index, items = arg
        members = self._resolve(items)
        return members[int(self._resolve(index))]

    def _fn_if(self, arg: Any) -> Any:
        name, if_true, if_false = arg
        return self._resolve(if_true if self.condition(str(name)) else if_false)

    def _fn_equals(self, arg: Any) -> bool:
        left, right = (self._resolve(v) for v in arg)
        return bool(_comparable(left) == _comparable(right))

    def _fn_not(self, arg: Any) -> bool:
        (operand,) = arg
        return not self.truth(operand)

    def _fn_and(self, arg: Any) -> bool:
        return all(self.truth(operand) for operand in arg)

    def _fn_or(self, arg: Any) -> bool:
        return any(self.truth(operand) for operand in arg)

    def _fn_contains(self, arg: Any) -> bool:
        members, wanted = (self._resolve(v) for v in arg)
        return _text(wanted) in [_text(m) for m in _as_list(members)]

    def _fn_each_member_equals(self, arg: Any) -> bool:
        members, wanted = (self._resolve(v) for v in arg)
        return all(_text(m) == _text(wanted) for m in _as_list(members))

    def _fn_each_member_in(self, arg: Any) -> bool:
        members, allowed = (self._resolve(v) for v in arg)
        permitted = {_text(a) for a in _as_list(allowed)}
        return all(_text(m) in permitted for m in _as_list(members))

    def _fn_sub(self, arg: Any) -> str:
        text, local_vars = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
        resolved_locals = {k: _text(self._resolve(v)) for k, v in local_vars.items()}

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in resolved_locals:
                return resolved_locals[name]
            if "." in name and not name.startswith("AWS::"):
                logical_id, attribute = name.split(".", 1)
                return self.get_att(logical_id, attribute)
            return self.ref(name)

        return _SUB_VAR.sub(substitute, str(text))

    _FUNCTIONS: ClassVar[dict[str, Callable[[Resolver, Any], Any]]] = {
        "Ref": _fn_ref,
        "Fn::GetAtt": _fn_get_att,
        "Fn::Sub": _fn_sub,
        "Fn::Join": _fn_join,
        "Fn::Select": _fn_select,
        "Fn::If": _fn_if,
        "Fn::Equals": _fn_equals,
        "Fn::Not": _fn_not,
        "Fn::And": _fn_and,
        "Fn::Or": _fn_or,
        "Fn::Contains": _fn_contains,
        "Fn::EachMemberEquals": _fn_each_member_equals,
        "Fn::EachMemberIn": _fn_each_member_in,
    }

    def check_rules(self, rules: Mapping[str, Any]) -> None:
        """Every applicable rule's assertions hold, or RuleViolation (as CloudFormation
        refuses a deploy before it creates anything)."""
        for name, rule in rules.items():
            applies = rule.get("RuleCondition")
            if applies is not None and not self.truth(applies):
                continue
            for assertion in rule.get("Assertions", []):
                if not self.truth(assertion["Assert"]):
                    description = assertion.get("AssertDescription", "assertion failed")
                    raise RuleViolation(f"rule {name}: {description}")

    def resource_exists(self, resource: Mapping[str, Any]) -> bool:
        """False for a resource whose `Condition` is false: CloudFormation skips it."""
        condition = resource.get("Condition")
        return condition is None or self.condition(str(condition))


def _text(value: Any) -> str:
    """A resolved scalar as CloudFormation's strings have it (true/false for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _comparable(value: Any) -> Any:
    if isinstance(value, list):
        return [_text(v) for v in value]
    return _text(value)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def parameter_values(template: Mapping[str, Any], overrides: Mapping[str, str]) -> dict[str, str]:
    values = {
        name: str(spec.get("Default", "")) for name, spec in template.get("Parameters", {}).items()
    }
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"parameters not in the template: {sorted(unknown)}")
    values.update({k: str(v) for k, v in overrides.items()})
    return values


def function_environment(
    template: Mapping[str, Any], logical_id: str, resolver: Resolver
) -> dict[str, str]:
    """Globals.Function env + the function's own, resolved: what Lambda would set."""
    global_env = (
        template.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    )
    function = template["Resources"][logical_id]["Properties"]
    own_env = function.get("Environment", {}).get("Variables", {})
    merged = {**global_env, **own_env}
    # Resolved as one mapping, so a variable whose value is AWS::NoValue is left out.
    resolved = resolver.resolve(merged) or {}
    return {name: _text(value) for name, value in resolved.items()}


def function_property(template: Mapping[str, Any], logical_id: str, name: str) -> Any:
    """A function property, falling back to Globals.Function as SAM does."""
    own = template["Resources"][logical_id].get("Properties", {})
    if name in own:
        return own[name]
    return template.get("Globals", {}).get("Function", {}).get(name)
