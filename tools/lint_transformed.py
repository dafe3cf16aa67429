"""cfn-lint on template.yaml after SAM's transform: the template CloudFormation really gets.

cfn-lint on the SAM template does not see inside what SAM generates: an SQS event's
`ScalingConfig` becomes an event source mapping whose `MaximumConcurrency` AWS bounds to
2-1000, and policy templates and inline statements become roles whose IAM actions are only
checked there. This writes the transformed template (`gpuqueue_local.sam_transform`, offline)
and lints it. Findings in SAM's own policy templates that we cannot change are forgiven one
by one in `FORGIVEN`, each with its reason; anything else fails.

Usage::

    python tools/lint_transformed.py [--template template.yaml]
                                     [--output .aws-sam/transformed/template.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import samtranslator
from cfnlint.api import ManualArgs, lint_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "local") not in sys.path:
    sys.path.insert(0, str(REPO / "local"))

from gpuqueue_local.sam_transform import transform  # noqa: E402
from gpuqueue_local.template import load_template  # noqa: E402

REGION = "us-east-1"
_QUOTED = re.compile(r"'([^']+)'")


@dataclass(frozen=True)
class Forgiven:
    """A finding inside a statement SAM writes from one of its policy templates."""

    rule: str
    policy_template: str
    actions: frozenset[str]  # lower case, service prefix included
    reason: str


FORGIVEN = (
    Forgiven(
        rule="W3037",
        policy_template="SQSPollerPolicy",
        actions=frozenset({"sqs:changemessagevisibilitybatch", "sqs:deletemessagebatch"}),
        reason=(
            "SAM's SQSPollerPolicy lists the batch calls as actions; IAM has none by those "
            "names (a batch call is authorised by sqs:ChangeMessageVisibility / "
            "sqs:DeleteMessage, which it also lists), so they grant nothing. SAM's, not ours."
        ),
    ),
)


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str
    path: tuple[str | int, ...]
    line: int
    column: int

    def __str__(self) -> str:
        where = "/".join(str(part) for part in self.path)
        return f"{self.rule} {self.message}" + (f" at {where}" if where else "")


@cache
def policy_template_actions(name: str) -> frozenset[str]:
    """The actions (lower case) of a SAM policy template's statements."""
    data = Path(samtranslator.__file__).parent / "policy_templates_data" / "policy_templates.json"
    definition = json.loads(data.read_text())["Templates"][name]["Definition"]
    actions: set[str] = set()
    for statement in definition["Statement"]:
        listed = statement["Action"]
        actions |= {str(a).lower() for a in (listed if isinstance(listed, list) else [listed])}
    return frozenset(actions)


def _at(template: Mapping[str, Any], path: Sequence[str | int]) -> Any:
    node: Any = template
    for key in path:
        node = node[key]
    return node


def forgiven_by(finding: Finding, template: Mapping[str, Any]) -> Forgiven | None:
    """The FORGIVEN entry covering this finding: same rule, the flagged action one of the
    entry's, and the statement's actions exactly those of the entry's policy template."""
    if not finding.path or finding.path[-1] != "Action":
        return None
    try:
        listed = _at(template, finding.path)
    except (KeyError, IndexError, TypeError):
        return None
    statement_actions = {str(a).lower() for a in (listed if isinstance(listed, list) else [listed])}
    flagged = _QUOTED.search(finding.message)
    for entry in FORGIVEN:
        if entry.rule != finding.rule or flagged is None:
            continue
        services = {a.split(":", 1)[0] for a in entry.actions}
        names = {f"{service}:{flagged.group(1).lower()}" for service in services}
        if names & entry.actions and statement_actions == policy_template_actions(
            entry.policy_template
        ):
            return entry
    return None


def lint(template: Mapping[str, Any], output: Path) -> tuple[list[Finding], list[Finding]]:
    """Transform, write to `output`, lint; (findings that fail, findings forgiven)."""
    transformed = transform(template, region=REGION)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(transformed, indent=1) + "\n", encoding="utf-8")
    matches = lint_file(output, ManualArgs(regions=[REGION]))
    failing: list[Finding] = []
    forgiven: list[Finding] = []
    for match in matches:
        finding = Finding(
            rule=str(match.rule.id),
            message=str(match.message),
            path=tuple(getattr(match, "path", ()) or ()),
            line=int(match.linenumber),
            column=int(match.columnnumber),
        )
        (forgiven if forgiven_by(finding, transformed) else failing).append(finding)
    return failing, forgiven


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cfn-lint the template after SAM's transform.")
    parser.add_argument("--template", type=Path, default=REPO / "template.yaml")
    parser.add_argument(
        "--output", type=Path, default=REPO / ".aws-sam" / "transformed" / "template.json"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    failing, forgiven = lint(load_template(args.template), args.output)
    for finding in failing:
        print(f"{finding}\n{args.output}:{finding.line}:{finding.column}\n")
    print(
        f"cfn-lint after SAM's transform ({args.output}): {len(failing)} findings, "
        f"{len(forgiven)} forgiven in SAM's policy templates (tools/lint_transformed.py "
        f"FORGIVEN), {time.monotonic() - started:.1f} s"
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
