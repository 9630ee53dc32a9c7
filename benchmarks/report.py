"""Where a benchmark's figures go: the table printed, and `OUT.json` (every number) and `OUT.md` (the table)."""

import json
from pathlib import Path


def write_report(out: str, results: dict, rows: list[str]) -> None:
    """Print the table `rows` and write `out` + `.json` (`results`) and `out` + `.md` (the table)."""
    table = "\n".join(rows)
    print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text(table + "\n")
