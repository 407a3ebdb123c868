"""report.md, PNG plots and summary.json for a finished run (placeholder, filled in below)."""

from __future__ import annotations


def write_report(run) -> None:
    pass


def print_summary(run) -> None:
    import json
    for name in ("base", "rl"):
        p = run.folder / "eval" / f"{name}.json"
        if p.exists():
            for row in json.loads(p.read_text())["rows"]:
                print(name, row)
