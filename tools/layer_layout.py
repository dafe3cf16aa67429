"""The layer's layout as the README shows it, drawn from the tree itself.

Every subpackage of `layers/common/gpuqueue/` with what it is for, and every module with the
first sentence of its docstring. The README holds this between two markers;
tests/unit/template/test_layer_layout.py fails when the two differ (a module added, moved or
re-described), so the README's map cannot go stale.

Usage::

    python tools/layer_layout.py            # print the block
    python tools/layer_layout.py --write    # rewrite the README's block (make layout)
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "layers" / "common" / "gpuqueue"
README = REPO / "README.md"
START = "<!-- layer-layout:start (tools/layer_layout.py --write) -->"
END = "<!-- layer-layout:end -->"

# What each subpackage is for. The `__init__.py`s stay empty (no re-exports), so the purpose
# lives here; a subpackage missing from this map is an error.
PURPOSES = {
    "api": "the HTTP edge the API functions share: resolver, error mapping, bodies, `Prefer: wait`",
    "auth": "accounts: tokens, the user pool, account rules, sign-in throttles",
    "intake": "accepting tasks: admission, rate limits, per-user share, queue position",
    "store": "data access: the tasks table, the queues, the bucket, DynamoDB conditions",
    "dispatch": "the worker pool: one message in, one task driven to its next state",
    "fleet": "the GPU endpoints: declarations, health, registry and slots, choice, stats",
    "gpu": "talking to GPU servers: protocol adapters, credentials, bounded calls and memory",
    "speech": "speech-to-text: audio formats, uploads, the synchronous route",
    "lifecycle": "what follows a task's state change: stream events, reaper, dead letters",
    "notify": "telling users: webhooks, their redelivery, WebSocket push",
}


def summary(path: Path) -> str:
    """The docstring's first sentence (its first paragraph's lines joined)."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    if not paragraph:
        raise SystemExit(f"{path.relative_to(REPO)} has no docstring: say what it holds")
    sentence, dot, _ = paragraph.partition(". ")
    return sentence + dot.strip()


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")


def layout() -> str:
    packages = sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    unknown = {p.name for p in packages} - set(PURPOSES)
    gone = set(PURPOSES) - {p.name for p in packages}
    if unknown or gone:
        raise SystemExit(f"PURPOSES out of date: new {sorted(unknown)}, gone {sorted(gone)}")
    lines = ["`layers/common/gpuqueue/`, the domain package every function imports:", ""]
    lines += [f"- `{m.name}`: {summary(m)}" for m in modules(PACKAGE)]
    for package in packages:
        lines.append(f"- `{package.name}/`: {PURPOSES[package.name]}")
        lines += [f"  - `{m.name}`: {summary(m)}" for m in modules(package)]
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str:
    _, sep, rest = text.partition(START + "\n")
    block, sep2, _after = rest.partition(END)
    if not (sep and sep2):
        raise SystemExit(f"README.md lacks the markers {START!r} … {END!r}")
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help="rewrite README.md's block")
    args = parser.parse_args(argv)
    drawn = layout()
    if not args.write:
        sys.stdout.write(drawn)
        return 0
    text = README.read_text()
    README.write_text(
        text.replace(START + "\n" + readme_block(text) + END, START + "\n" + drawn + END)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
