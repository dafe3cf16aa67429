"""EventBridge event patterns, as EventBridge rules and Lambda event filtering use them.

One matcher for the local stack's S3 -> EventBridge rules (s3_events) and for the
FilterCriteria of its event source mappings (DynamoDB Streams): Lambda's filter syntax is
EventBridge's. A pattern is validated first, so one the matcher cannot honour fails at
start-up instead of silently matching or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class UnsupportedPattern(ValueError):
    """A pattern uses an EventBridge feature this matcher does not implement."""


_MISSING = object()


def matches(pattern: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    """Whether an EventBridge event pattern matches an event.

    Supported: nested objects; leaf arrays of exact values (strings, numbers, booleans,
    null), `{"prefix": s}`, `{"suffix": s}`, `{"equals-ignore-case": s}`, `{"exists": b}`,
    `{"anything-but": value | [values] | {"prefix": s}}`. A leaf matches when any of its
    entries matches the event's value, or any element of it when the value is an array.
    Anything else (numeric, cidr, wildcard, $or) raises UnsupportedPattern, whatever the
    event, rather than silently matching or not.
    """
    validate_pattern(pattern)
    return matches_validated(pattern, event)


_SCALARS = (str, int, float, bool, type(None))
_STRING_OPERATORS = frozenset({"prefix", "suffix", "equals-ignore-case"})


def validate_pattern(pattern: Any, path: str = "") -> None:
    """Raise UnsupportedPattern unless `matches` implements everything the pattern uses."""
    if not isinstance(pattern, Mapping):
        raise UnsupportedPattern(f"{path or 'a pattern'} must be a JSON object, got {pattern!r}")
    for name, expected in pattern.items():
        where = f"{path}.{name}" if path else str(name)
        if str(name).startswith("$"):
            raise UnsupportedPattern(f"{where}: {name} is not supported by the local matcher")
        if isinstance(expected, Mapping):
            validate_pattern(expected, where)
        elif isinstance(expected, list):
            for entry in expected:
                _validate_entry(entry, where)
        else:
            raise UnsupportedPattern(f"{where}: a pattern's leaf is an array, got {expected!r}")


def _validate_entry(entry: Any, where: str, *, inside_anything_but: bool = False) -> None:
    if isinstance(entry, _SCALARS):
        return
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise UnsupportedPattern(f"{where}: one operator per matcher, got {entry!r}")
    ((operator, operand),) = entry.items()
    if operator in _STRING_OPERATORS:
        if not isinstance(operand, str):
            raise UnsupportedPattern(f"{where}: {operator} wants a string, got {operand!r}")
    elif operator == "exists" and not inside_anything_but:
        if not isinstance(operand, bool):
            raise UnsupportedPattern(f"{where}: exists wants true or false, got {operand!r}")
    elif operator == "anything-but" and not inside_anything_but:
        _validate_anything_but(operand, where)
    else:
        raise UnsupportedPattern(f"{where}: {operator} is not supported by the local matcher")


def _validate_anything_but(operand: Any, where: str) -> None:
    if isinstance(operand, Mapping):
        if set(operand) - {"prefix", "suffix"}:
            raise UnsupportedPattern(f"{where}: anything-but {operand!r} is not supported")
        _validate_entry(operand, where, inside_anything_but=True)
        return
    for excluded in operand if isinstance(operand, list) else [operand]:
        if not isinstance(excluded, _SCALARS):
            raise UnsupportedPattern(f"{where}: anything-but wants values, got {operand!r}")


def matches_validated(pattern: Mapping[str, Any], event: Any) -> bool:
    """`matches` for a pattern `validate_pattern` has already accepted (no re-validation)."""
    for name, expected in pattern.items():
        value = event.get(name, _MISSING) if isinstance(event, Mapping) else _MISSING
        if isinstance(expected, Mapping):
            # EventBridge matches flattened paths: where the event has no object here, every
            # path below is absent, which only `{"exists": false}` leaves match.
            if not matches_validated(expected, value if isinstance(value, Mapping) else {}):
                return False
        elif not _leaf_matches(expected, value):
            return False
    return True


def _leaf_matches(entries: list[Any], value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    for entry in entries:
        if isinstance(entry, Mapping) and "exists" in entry:
            if _exists_matches(entry, value):
                return True
            continue
        if any(v is not _MISSING and _entry_matches(entry, v) for v in values):
            return True
    return False


def _exists_matches(entry: Mapping[str, Any], value: Any) -> bool:
    present = value is not _MISSING and not isinstance(value, Mapping)
    return present is entry["exists"]


def _entry_matches(entry: Any, value: Any) -> bool:
    if not isinstance(entry, Mapping):
        return _json_equal(entry, value)
    ((operator, operand),) = entry.items()  # validated: one of the operators below
    if operator == "prefix":
        return isinstance(value, str) and value.startswith(operand)
    if operator == "suffix":
        return isinstance(value, str) and value.endswith(operand)
    if operator == "equals-ignore-case":
        return isinstance(value, str) and value.casefold() == operand.casefold()
    if isinstance(operand, Mapping):  # anything-but a prefix or suffix
        return not _entry_matches(operand, value)
    excluded = operand if isinstance(operand, list) else [operand]  # anything-but values
    return not any(_entry_matches(e, value) for e in excluded)


def _json_equal(expected: Any, value: Any) -> bool:
    """Exact matching compares JSON values: "1" is not 1, and true is not 1."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return expected is value
    if isinstance(expected, int | float) and isinstance(value, int | float):
        return float(expected) == float(value)
    return type(expected) is type(value) and bool(expected == value)
