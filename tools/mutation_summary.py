"""Per-module counts of a `make mutate` run (mutmut's .meta files), as a Markdown table,
then every mutant that was not killed, by name (`mutmut show NAME` prints its diff)."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious", "not checked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mutants", type=Path, default=Path(".mutmut/mutants"))
    args = parser.parse_args()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    unkilled: list[tuple[str, str]] = []
    for meta in sorted(args.mutants.glob("src/**/*.py.meta")):
        module = ".".join(
            meta.relative_to(args.mutants / "src").with_suffix("").with_suffix("").parts
        )
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = status_by_exit_code[code]
            status = status if status in COLUMNS else "suspicious"
            counts[module][status] += 1
            if status != "killed":
                unkilled.append((status, name))
    print("| module | mutants | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    total: Counter[str] = Counter()
    for module, counter in sorted(counts.items()):
        total += counter
        cells = " | ".join(str(counter[c]) for c in COLUMNS)
        print(f"| {module} | {counter.total()} | {cells} |")
    cells = " | ".join(str(total[c]) for c in COLUMNS)
    print(f"| **all** | {total.total()} | {cells} |")
    print()
    for status, name in sorted(unkilled):
        print(f"{status}: {name}")


if __name__ == "__main__":
    main()
