"""A results table from run directories (each with a results.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_results(dirs: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no results.json (is the run finished?)")
        rows.append({"run": d.name, **json.loads(path.read_text())})
    return rows


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one row per run, Base / Novel / HM / Local in percent."""
    lines = [
        "| run | method | dataset | partition | shots | rounds | Base | Novel | HM | Local |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['method']} | {r['dataset']} | {r['partition']} | {r.get('shots')} | {r['rounds']} | "
            f"{_fmt(r.get('base_acc'))} | {_fmt(r.get('novel_acc'))} | {_fmt(r.get('hm'))} | {_fmt(r.get('local_acc'))} |"
        )
    return "\n".join(lines)
