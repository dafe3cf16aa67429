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


@dataclass
class Resolver:
    """Resolves Ref / Fn::GetAtt / Fn::Sub / Fn::Join against local values."""

    parameters: dict[str, str]
    pseudo: dict[str, str]
    refs: dict[str, str] = field(default_factory=dict)
    attributes: dict[tuple[str, str], str] = field(default_factory=dict)

    def ref(self, name: str) -> str:
        for table in (self.pseudo, self.parameters, self.refs):
            if name in table:
                return table[name]
        raise UnresolvedReference(name)

    def get_att(self, logical_id: str, attribute: str) -> str:
        try:
            return self.attributes[(logical_id, attribute)]
        except KeyError:
            raise UnresolvedReference(f"{logical_id}.{attribute}") from None

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self.ref(str(arg))
            if key == "Fn::GetAtt":
                parts = arg if isinstance(arg, list) else str(arg).split(".", 1)
                return self.get_att(str(parts[0]), str(parts[1]))
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::Join":
                separator, items = arg
                return str(separator).join(str(self.resolve(i)) for i in items)
        return {k: self.resolve(v) for k, v in value.items()}

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
