"""A finished suite's runs read back from its output folder, grouped into cells (scenario x method).

Shared by the report (tables, comparisons) and the plots.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METRICS = (("base_acc", "Base"), ("novel_acc", "Novel"), ("hm", "HM"), ("local_acc", "Local"))
RL_DIAGNOSTICS = (
    ("client_reward", "reward"),
    ("client_silent_groups", "silent groups"),
    ("client_kl", "KL"),
    ("client_clip_fraction", "clip frac."),
)
"""Final-round means over clients, as the runs log them (RL rounds only)."""


@dataclass
class Run:
    seed: int
    results: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    def per_domain(self) -> dict[str, dict[str, float]] | None:
        if "per_domain_acc" in self.results:
            return self.results["per_domain_acc"]
        evals = [m for m in self.metrics if "per_domain_acc" in m]
        return evals[-1]["per_domain_acc"] if evals else None


@dataclass
class CellSummary:
    """One (scenario, method) over its seeds."""

    scenario: str
    method: str
    runs: list[Run] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [float(r.results[key]) for r in self.runs if r.results.get(key) is not None]

    def stat(self, key: str) -> tuple[float, float]:
        return mean_std(self.values(key))

    def rl(self, key: str) -> float:
        vals = [float(r.final[key]) for r in self.runs if r.final.get(key) is not None]
        return float(np.mean(vals)) if vals else math.nan


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(out: Path) -> tuple[dict[str, Any], dict[tuple[str, str], CellSummary]]:
    """(suite TOML as a dict, {(scenario, method): summary}) of the finished cells under ``out``."""
    suite_path = out / "suite.toml"
    if not suite_path.is_file():
        raise FileNotFoundError(f"{out}: no suite.toml (is this a `feddtl bench` output folder?)")
    suite = tomllib.loads(suite_path.read_text())
    chosen = suite.get("bench")  # `feddtl bench --scenarios/--methods` ran part of the suite: report that part
    if isinstance(chosen, dict):
        suite["scenario"] = [sc for sc in suite.get("scenario", []) if sc.get("name") in chosen.get("scenarios", [])]
        suite["methods"] = [m for m in suite.get("methods", []) if m in chosen.get("methods", [])]
    cells: dict[tuple[str, str], CellSummary] = {}
    for sc in suite.get("scenario", []):
        for method in suite.get("methods", []):
            summary = CellSummary(sc["name"], method)
            folder = out / "runs" / sc["name"] / method
            for seed_dir in sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0):
                results_path = seed_dir / "results.json"
                if not results_path.is_file():
                    continue
                summary.runs.append(
                    Run(int(seed_dir.name[4:]), json.loads(results_path.read_text()), _read_json_lines(seed_dir / "metrics.jsonl"))
                )
            cells[(sc["name"], method)] = summary
    return suite, cells


def domain_names(cells: dict[tuple[str, str], CellSummary], scenario: str, methods: list[str]) -> list[str]:
    for m in methods:
        for run in cells[(scenario, m)].runs:
            pd = run.per_domain()
            if pd:
                return list(pd)
    return []


def domain_stats(summary: CellSummary, domain: str, key: str) -> tuple[float, float]:
    vals = []
    for run in summary.runs:
        pd = run.per_domain() or {}
        v = pd.get(domain, {}).get(key)
        if v is not None:
            vals.append(float(v))
    return mean_std(vals)
