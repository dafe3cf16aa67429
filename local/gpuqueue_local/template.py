"""Reading template.yaml: load it with its short tags and resolve intrinsics locally.

The local stack and the tests read the template rather than repeating it, so a table,
queue or env var exists locally exactly when the template declares it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    loaded: dict[str, Any] = _plain(_cfn_load(str(path)))
    return loaded


def resources_of_type(template: Mapping[str, Any], *types: str) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in template.get("Resources", {}).items()
        if resource.get("Type") in types
    }


class UnresolvedReference(LookupError):
    """An intrinsic names a resource that has no local physical id (yet)."""


class _NoValue:
    """`Ref: AWS::NoValue`: the property (or list item) holding it is left out."""

    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()


@dataclass
class Resolver:
    """Resolves Ref / Fn::GetAtt / Fn::Sub / Fn::Join / Fn::If against local values.

    `conditions` is the template's `Conditions` section, evaluated on demand (Fn::Equals,
    Fn::Not, Fn::And, Fn::Or, Condition) with the parameters' values, as CloudFormation does;
    a property whose value resolves to `AWS::NoValue` is dropped.
    """

    parameters: dict[str, str]
    pseudo: dict[str, str]
    refs: dict[str, str] = field(default_factory=dict)
    attributes: dict[tuple[str, str], str] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)

    def ref(self, name: str) -> str:
        for table in (self.pseudo, self.parameters, self.refs):
            if name in table:
                return table[name]
        raise UnresolvedReference(name)

    def condition(self, name: str) -> bool:
        """The value of the named condition of the template."""
        if name not in self.conditions:
            raise UnresolvedReference(f"condition {name}")
        return self._truth(self.conditions[name])

    def _truth(self, expression: Any) -> bool:
        if isinstance(expression, dict) and len(expression) == 1:
            ((key, arg),) = expression.items()
            if key == "Condition":
                return self.condition(str(arg))
            if key == "Fn::Equals":
                left, right = (self.resolve(side) for side in arg)
                # CloudFormation compares the values as strings (a Number parameter is one).
                return _as_text(left) == _as_text(right)
            if key == "Fn::Not":
                (inner,) = arg
                return not self._truth(inner)
            if key == "Fn::And":
                return all(self._truth(inner) for inner in arg)
            if key == "Fn::Or":
                return any(self._truth(inner) for inner in arg)
        raise ValueError(f"not a condition: {expression!r}")

    def get_att(self, logical_id: str, attribute: str) -> str:
        try:
            return self.attributes[(logical_id, attribute)]
        except KeyError:
            raise UnresolvedReference(f"{logical_id}.{attribute}") from None

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(v) for v in value]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return NO_VALUE if arg == "AWS::NoValue" else self.ref(str(arg))
            if key == "Fn::If":
                name, when_true, when_false = arg
                return self.resolve(when_true if self.condition(str(name)) else when_false)
            if key == "Fn::GetAtt":
                parts = arg if isinstance(arg, list) else str(arg).split(".", 1)
                return self.get_att(str(parts[0]), str(parts[1]))
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::Join":
                separator, items = arg
                return str(separator).join(str(self.resolve(i)) for i in items)
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not NO_VALUE}

    def _sub(self, arg: Any) -> str:
        text, local_vars = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
        resolved_locals = {k: str(self.resolve(v)) for k, v in local_vars.items()}

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in resolved_locals:
                return resolved_locals[name]
            if "." in name and not name.startswith("AWS::"):
                logical_id, attribute = name.split(".", 1)
                return self.get_att(logical_id, attribute)
            return self.ref(name)

        return _SUB_VAR.sub(substitute, str(text))


def _as_text(value: Any) -> str:
    """A value as CloudFormation compares it: true/false in lower case, numbers as written."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


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
    return {name: str(resolver.resolve(value)) for name, value in merged.items()}


def function_property(template: Mapping[str, Any], logical_id: str, name: str) -> Any:
    """A function property, falling back to Globals.Function as SAM does."""
    own = template["Resources"][logical_id].get("Properties", {})
    if name in own:
        return own[name]
    return template.get("Globals", {}).get("Function", {}).get(name)
