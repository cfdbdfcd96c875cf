"""A results table from run directories (each with a results.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_results(dirs: list[Path]) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """One row per run directory that holds a results.json, and (directory, why) for each one skipped:
    a folder that is missing or holds no readable results.json (an unfinished run) is not an error, so a
    table of the finished runs can be printed while others still run."""
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    for d in dirs:
        path = d / "results.json"
        if not d.is_dir():
            skipped.append((d, "no such folder"))
        elif not path.is_file():
            skipped.append((d, "no results.json (an unfinished run?)"))
        else:
            try:
                results = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                skipped.append((d, f"results.json cannot be read ({exc})"))
                continue
            if not isinstance(results, dict):
                skipped.append((d, "results.json does not hold a JSON object"))
                continue
            rows.append({"run": d.name, **results})
    return rows, skipped


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
